"""Resuming with another number of ranks or a changed config is refused before any process
group starts, with the reason (global batch before/after, the changed keys); the config check
yields to --allow-config-change."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import REFERENCE
from tests.trainer.harness import ROOT, TINY, assert_ok, base, latest_dir, run_train, train_env

pytestmark = pytest.mark.slow


def dit(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)


def launch(nproc: int, overrides: list[str], *flags: str) -> subprocess.CompletedProcess:
    return dit("launch", "--launcher", "torchrun", f"--nproc-per-node={nproc}", *flags, str(TINY), *overrides)


@pytest.fixture
def copied(reference_run, tmp_path) -> Path:
    """A run directory holding the reference run's checkpoints (2 ranks, global batch 8)."""
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
    return out


def test_two_ranks_to_one_is_refused_with_the_global_batch(copied, uneven_shards):
    proc = dit("train", str(TINY), *base(uneven_shards, copied, *REFERENCE, "stage.steps=16"))
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "written by 2 ranks (global batch 8) and this job has 1 (global batch 4)" in proc.stderr
    assert "Resume with 2 ranks" in proc.stderr
    assert "process group" not in proc.stderr.lower() and "deepspeed" not in proc.stdout.lower()
    assert latest_dir(copied).name == "step_00000012"


def test_one_rank_to_two_is_refused_with_the_global_batch(uneven_shards, tmp_path):
    out = tmp_path / "run"
    args = base(uneven_shards, out, "stage.steps=2", "checkpoint.every=2")
    assert_ok(run_train(1, args))
    proc = launch(2, args[:-2] + ["stage.steps=4"])
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "written by 1 ranks (global batch 4) and this job has 2 (global batch 8)" in proc.stderr
    assert not (out / "logs" / "launch").exists()  # refused before any rank was started


@pytest.mark.parametrize("change, listed", [
    ("model.preset=DiT-S/2", "model.preset: 'DiT-T/2' -> 'DiT-S/2'"),
    ("data.batch_size=2", "data.batch_size: 4 -> 2"),
    ("data.shards=SOURCE", "data.shards: "),
])
def test_a_changed_config_is_refused_listing_the_differences(copied, uneven_shards, tmp_path, change, listed):
    if change == "data.shards=SOURCE":
        other = shutil.copytree(uneven_shards, tmp_path / "other_source")
        change = f"data.shards={other}"
    proc = launch(2, base(uneven_shards, copied, *REFERENCE, "stage.steps=16") + [change])
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "the config differs from the one" in proc.stderr and listed in proc.stderr
    assert "--allow-config-change" in proc.stderr
    assert not (copied / "logs" / "launch").exists()


def test_allow_config_change_resumes_with_the_new_batch(copied, uneven_shards):
    proc = launch(2, base(uneven_shards, copied, *REFERENCE, "stage.steps=14", "data.batch_size=2"),
                  "--allow-config-change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_dir(copied).name == "step_00000014"
