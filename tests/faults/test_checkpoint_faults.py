"""Checkpoints under faults: a kill during the write, a disk that fills up, retention, and a
file replaced by a malicious pickle. `latest` only ever names a complete, verified checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.data.data_helpers import TouchOnUnpickle
from tests.faults.conftest import REFERENCE
from tests.trainer.harness import (assert_ok, base, latest_dir, popen_train, rank_exit_codes, run_train,
                                   wait_for_file)
from trainer.checkpoint import (COMPLETE, EMA_FILE, LATEST, TMP_PREFIX, CheckpointError,
                                CheckpointManager, load_for_inference)
from trainer.config import CheckpointConfig

pytestmark = pytest.mark.slow


def complete_steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*") if (p / COMPLETE).is_file())


def test_sigterm_then_kill9_during_a_checkpoint_write(uneven_shards, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    args = base(uneven_shards, out, "stage.steps=8", "checkpoint.every=4")
    proc = popen_train(2, args, DIT_INJECT_SAVE_STALL=f"{marker}@8")
    try:
        wait_for_file(marker, proc)  # the engine states of step 8 are on disk, the commit is not
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(1.0)  # let SIGTERM land mid-write before the hard kill, as a scheduler does
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    ckpts = out / "checkpoints"
    assert (ckpts / LATEST).read_text().strip() == "step_00000004"
    assert (ckpts / f"{TMP_PREFIX}step_00000008").is_dir() and not (ckpts / "step_00000008").exists()
    assert not (ckpts / f"{TMP_PREFIX}step_00000008" / COMPLETE).exists()
    resumed = run_train(2, args)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert not (ckpts / f"{TMP_PREFIX}step_00000008").exists()  # the partial directory is cleaned
    assert json.loads((ckpts / "step_00000008" / COMPLETE).read_text())["step"] == 8


def test_the_ranks_wait_for_rank0s_own_work_longer_than_the_collective_timeout(uneven_shards, tmp_path):
    """Rank 0 alone writes a checkpoint's whole-tensor files (universal, EMA) and draws the sample
    grids; for a model of some billions of parameters that takes longer than
    deepspeed.comm_timeout_s (600 s), and the other ranks, waiting in their next collective, were
    ended by its timeout (NCCL's watchdog on GPUs), also inside DeepSpeed's save, whose barrier
    waits for rank 0's module file. They wait on a gloo group bounded by
    deepspeed.rank0_timeout_s instead: here rank 0's module file, whole-tensor files and grid
    each take 15 s longer than the 10 s collective timeout, and the run ends well (it failed at
    the save before)."""
    out = tmp_path / "run"
    proc = run_train(2, base(uneven_shards, out, "stage.steps=2", "checkpoint.every=2", "log.sample_every=2",
                             "deepspeed.comm_timeout_s=10"), DIT_INJECT_RANK0_SLOW="15")
    assert_ok(proc)
    assert complete_steps(out) == ["step_00000002"]
    assert (out / "logs" / "samples" / "step_00000002.png").is_file()


def test_retention_waits_for_the_commit_and_a_full_disk_keeps_the_previous_checkpoint(uneven_shards, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    args = base(uneven_shards, out, "stage.steps=12", "checkpoint.every=4", "checkpoint.keep=1")
    proc = popen_train(2, args, DIT_INJECT_SAVE_STALL=f"{marker}@8", DIT_INJECT_SAVE_ERROR="0@12")
    try:
        wait_for_file(marker, proc)
        # Mid-save of step 8 with keep=1: the only valid checkpoint (4) is still there.
        assert complete_steps(out) == ["step_00000004"]
        assert latest_dir(out).name == "step_00000004"
        Path(f"{marker}.release").touch()
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rank_exit_codes(subprocess.CompletedProcess([], proc.returncode, output, "")) == {4}, output[-4000:]
    assert "No space left on device" in output and "the disk holding checkpoint.dir is full" in output
    # 4 went only once 8 was committed; the failed 12 left nothing and `latest` stayed on 8.
    assert complete_steps(out) == ["step_00000008"] and latest_dir(out).name == "step_00000008"
    assert not list((out / "checkpoints").glob(f"{TMP_PREFIX}*"))
    CheckpointManager(CheckpointConfig(dir=str(out / "checkpoints")), 0, 2).verify(latest_dir(out))
    resumed = run_train(2, args)
    assert_ok(resumed)
    assert "at step 8" in resumed.stdout
    assert complete_steps(out) == ["step_00000012"]


def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_run(reference_run, uneven_shards, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
    step = out / "checkpoints" / "step_00000012"
    victim = step / "student" / "mp_rank_00_model_states.pt"
    torch.save({"module": TouchOnUnpickle(marker)}, victim)
    args = base(uneven_shards, out, *REFERENCE, "stage.steps=16")
    refused = run_train(2, args)
    assert rank_exit_codes(refused) == {4} and "sha256 mismatch" in refused.stderr
    # With the hash list rewritten to match, the weights-only loader still refuses the pickle.
    complete = json.loads((step / COMPLETE).read_text())
    complete["files"]["student/mp_rank_00_model_states.pt"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    (step / COMPLETE).write_text(json.dumps(complete))
    refused = run_train(2, args)
    assert rank_exit_codes(refused) == {4} and "refusing to load" in refused.stderr
    assert "weights-only allowlist" in refused.stderr
    # Inference weights are safetensors: a pickle in their place is refused without running it.
    (step / EMA_FILE).write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    with pytest.raises(CheckpointError, match="modified after it was written"):
        load_for_inference(step)
    assert not marker.exists()
