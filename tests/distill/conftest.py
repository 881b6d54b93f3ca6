"""A real teacher for the distillation runs: a short `dit train` of configs/test_tiny.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.harness import run_train, shapes_shards  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def tiny_teacher(shapes_shards, tmp_path_factory) -> Path:  # noqa: F811
    """Checkpoint root of a 4-step pretraining run on 2 ranks (EMA weights + config.yaml)."""
    out = tmp_path_factory.mktemp("teacher")
    proc = run_train(2, [f"data.shards={shapes_shards}", f"run.out_dir={out}", "stage.steps=4", "checkpoint.every=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out / "checkpoints"
