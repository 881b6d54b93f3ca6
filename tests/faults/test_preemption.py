"""SIGUSR1 to a single rank (a scheduler's warning before preemption): every rank agrees at
the end of the next step (the ranks' answer is read a step late: trainer/distributed.py),
saves within the grace period, exits with the requeue code, and the
rerun resumes on exactly that step and ends bit-equal to the uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.conftest import REFERENCE
from tests.trainer.harness import (assert_ok, base, ema_weights, final_weights, latest_dir, popen_train,
                                   rank_exit_codes, rank_pid, run_train, same_tensors, wait_for_file)

pytestmark = pytest.mark.slow

GRACE_S = 90  # what `sbatch --signal=USR1@90` leaves; our SLURM script asks for as much


def test_sigusr1_on_one_rank_saves_on_every_rank_and_requeues(uneven_shards, reference_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    args = base(uneven_shards, out, *REFERENCE)
    # The save of step 8 pauses so that the signal lands at a known point: during step 9; the
    # ranks learn of it at the end of step 10.
    proc = popen_train(2, args, DIT_INJECT_SAVE_STALL=f"{marker}@8")
    try:
        wait_for_file(marker, proc)
        os.kill(rank_pid(proc.pid, 1), signal.SIGUSR1)
        signalled = time.monotonic()
        Path(f"{marker}.release").touch()
        output, _ = proc.communicate(timeout=GRACE_S + 30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rank_exit_codes(subprocess.CompletedProcess([], proc.returncode, output, "")) == {42}, output[-4000:]
    assert took < GRACE_S, took
    print(f"saved and exited {took:.1f} s after SIGUSR1")
    assert "preempted; saved step 10" in output
    assert latest_dir(out).name == "step_00000010"
    resumed = run_train(2, args)
    assert_ok(resumed)
    assert "at step 10" in resumed.stdout
    assert same_tensors(final_weights(out), final_weights(reference_run))
    assert same_tensors(ema_weights(out), ema_weights(reference_run))
