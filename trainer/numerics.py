"""The numerics of a forward pass: mixed precision under autocast, and, for samples drawn during
training, the linear layers as torch ships them (not ZeRO-3's replacement)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn


T = TypeVar("T")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision for forward passes: autocast to bf16/fp16 on the step's device (matmuls
    and convolutions in half precision, reductions and norms in fp32; Micikevicius et al. 2018);
    nothing for fp32. Backward runs outside it, as torch.autocast requires."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def autocast_each(make: Callable[[], T], device: torch.device, precision: str) -> Iterator[T]:
    """`make()` again and again, each built under the precision's autocast and yielded outside
    it: autocast is a per-thread switch, so a generator paused inside it would leave it on for
    whatever its consumer runs between two items (DeepSpeed's pipeline engine pulls micro-batches
    between its forward, backward and optimizer passes, and keeps the iterator after the step)."""
    while True:
        with autocast(device, precision):
            item = make()
        yield item


def autocast_inside(module: nn.Module, device: torch.device, precision: str) -> None:
    """Make `module`'s own call enter the precision's autocast (hooks around its forward), so it
    holds inside a DeepSpeed engine: the engine's forward turns an enclosing autocast off on CUDA
    (`deepspeed.runtime.torch_autocast.autocast_if_enabled`: "enabled outside DeepSpeed but
    disabled within the engine" unless its own `torch_autocast` mode is configured), and the bf16
    or fp16 weights of its half-precision modes would then meet fp32 inputs. Nothing for fp32."""
    if precision == "fp32":
        return
    entered: list[contextlib.AbstractContextManager] = []

    def enter(_module: nn.Module, _args: tuple) -> None:
        entered.append(autocast(device, precision))
        entered[-1].__enter__()

    def leave(_module: nn.Module, _args: tuple, _output) -> None:
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


@contextlib.contextmanager
def inference_numerics(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast as in training, and `torch.nn.functional.linear` as torch ships it: ZeRO-3
    replaces it process-wide by DeepSpeed's memory-efficient version
    (`zero_optimization.memory_efficient_linear`), which adds the bias after the matmul has
    rounded, so under bf16 every linear layer would round differently from the same network
    outside DeepSpeed. Samples and evaluations drawn in training then equal, bit for bit, those
    of the checkpoint's weights drawn outside DeepSpeed under the same autocast with the frozen
    helpers in the training precision (tests/trainer/harness.py, `assert_checkpoint_samples_match`);
    `dit sample` / `dit eval` sample under this autocast with `--precision` the run's (the default
    on an accelerator), their helpers' weights in float32 (the text encoder's in model.text.precision,
    as in training): equal up to rounding."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    current, original = F.linear, getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", F.linear)
    F.linear = original
    try:
        with autocast(device, precision):
            yield
    finally:
        F.linear = current
