"""Test-wide settings: offline hub, CPU DeepSpeed, one thread per process on the 2-core box."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# One intra-op thread in the test process, as the ranks run (OMP_NUM_THREADS=1): the in-process
# tests are tiny models whose ops are too small to split, and two threads on this 2-core box
# spin against the ranks and the other tests' work (test_distill_math: 46 s of CPU on two
# threads, 15 s on one). It also makes in-process results comparable with the ranks' own.
torch.set_num_threads(1)

from tests.trainer.harness import mixed_shards, shapes_shards, tiny_teacher, video_shards  # noqa: E402,F401  (session fixtures, shared)
