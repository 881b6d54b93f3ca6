"""A resume that cannot keep the global batch, or with a changed config, is refused before any
process group starts, with the reason (global batch before/after, the changed keys); the config
check yields to --allow-config-change. (Resumes on another number of ranks that keep the global
batch: test_elastic_resume.py.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import REFERENCE
from tests.trainer.harness import ROOT, TINY, base, latest_dir, train_env

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


def test_a_global_batch_that_cannot_be_kept_is_refused_naming_both(copied, uneven_shards):
    """3 ranks cannot keep the reference's global batch 8 (4 per rank x grad_accum): `dit launch`
    refuses before starting any rank."""
    proc = launch(3, base(uneven_shards, copied, *REFERENCE, "stage.steps=16"), "--max-restarts=2")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "global batch 8 (2 data-parallel rank(s) x data.batch_size 4 x deepspeed.grad_accum 1" in proc.stderr
    assert "this job has 3 rank(s) and 1 pipeline stage(s), global batch 12" in proc.stderr
    assert not (copied / "logs" / "launch").exists()  # refused before any rank was started
    assert latest_dir(copied).name == "step_00000012"


@pytest.mark.parametrize("change, listed", [
    ("model.preset=DiT-S/2", "model.preset: 'DiT-T/2' -> 'DiT-S/2'"),
    ("data.batch_size=2", "data.batch_size: 4 -> 2"),
    pytest.param("deepspeed.grad_accum=2", "deepspeed.grad_accum: 1 -> 2\n(the global batch changes from 8 to 16)",
                 id="grad_accum-on-the-same-ranks"),
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


def test_slurm_runs_the_same_resume_check_for_every_allocation(copied, uneven_shards):
    """`dit launch --slurm` refuses what the local launch refuses, before writing a script: the
    smallest allocation --min-nodes allows (3 nodes of 1 rank) cannot keep the global batch 8;
    a range whose every size keeps it (1 or 2 ranks) is accepted."""
    overrides = base(uneven_shards, copied, *REFERENCE, "stage.steps=16")
    refused = dit("launch", str(TINY), *overrides, "--slurm", "--dry-run", "--nodes", "4", "--min-nodes", "3")
    assert refused.returncode == 4, refused.stderr[-3000:]
    assert "this job has 3 rank(s) and 1 pipeline stage(s), global batch 12" in refused.stderr
    assert not (copied / "logs" / "slurm").exists()
    accepted = dit("launch", str(TINY), *overrides, "--slurm", "--dry-run", "--nodes", "2", "--min-nodes", "1")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "#SBATCH --nodes=1-2" in accepted.stdout
