"""Put on PYTHONPATH of the ranks of test_precision_offload's fp16 test: DeepSpeed's CPU
accelerator reports fp16 support (it does only with AVX512-FP16, which this machine lacks,
though torch runs fp16 on any CPU), so `deepspeed.precision=fp16` is accepted and DeepSpeed's
own fp16 optimizer, dynamic loss scaler and overflow test run for real over gloo."""
from deepspeed.accelerator import cpu_accelerator

cpu_accelerator.CPU_Accelerator.is_fp16_supported = lambda self: True
