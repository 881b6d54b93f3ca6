"""Harness of the multi-process trainer tests: real `dit train` ranks started by torchrun over gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "test_tiny.yaml"


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """Real synthetic-shapes tar shards at 16 px, shared by the trainer tests."""
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    out = tmp_path_factory.mktemp("shapes")
    write_shards(synth_samples(96, seed=0, size=16), str(out), shard_size=24, progress=False)
    return out


def torchrun_cmd(nproc: int, overrides: list[str], config: Path = TINY) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "launch.cli", "train", str(config), *overrides]


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_train(nproc: int, overrides: list[str], timeout: int = 300, config: Path = TINY,
              **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, overrides, config), cwd=ROOT, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}
