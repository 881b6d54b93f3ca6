"""Test-wide settings: offline hub, CPU DeepSpeed, small thread counts on the 2-core box."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.trainer.harness import mixed_shards, shapes_shards, tiny_teacher  # noqa: E402,F401  (session fixtures, shared)
