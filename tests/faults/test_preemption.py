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

GRACE_S = 90  # less than what our SLURM script leaves (`--signal=USR1@T`, T = --shutdown-timeout + 20 s: 120 by default)


def preempt_in_step_9(nproc: int, args: list[str], marker: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run, SIGUSR1 the last rank while step 9 runs (the save of step 8 pauses so that the
    signal lands at a known point; the ranks learn of it at the end of step 10); the finished
    run and the seconds from the signal to its exit."""
    proc = popen_train(nproc, args, DIT_INJECT_SAVE_STALL=f"{marker}@8")
    try:
        wait_for_file(marker, proc)
        os.kill(rank_pid(proc.pid, nproc - 1), signal.SIGUSR1)
        signalled = time.monotonic()
        Path(f"{marker}.release").touch()
        output, _ = proc.communicate(timeout=GRACE_S + 30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess([], proc.returncode, output, ""), took


def test_sigusr1_on_one_rank_saves_on_every_rank_and_requeues(uneven_shards, reference_run, tmp_path):
    out = tmp_path / "run"
    args = base(uneven_shards, out, *REFERENCE)
    done, took = preempt_in_step_9(2, args, tmp_path / "saving")
    output = done.stdout
    assert rank_exit_codes(done) == {42}, output[-4000:]
    assert took < GRACE_S, took
    print(f"saved and exited {took:.1f} s after SIGUSR1")
    assert "preempted; saved step 10" in output
    assert latest_dir(out).name == "step_00000010"
    resumed = run_train(2, args)
    assert_ok(resumed)
    assert "at step 10" in resumed.stdout
    assert same_tensors(final_weights(out), final_weights(reference_run))
    assert same_tensors(ema_weights(out), ema_weights(reference_run))


def test_a_signal_while_the_ranks_start_requeues_them_all(uneven_shards, tmp_path):
    """SIGUSR1 to one rank before the first step (while the ranks import, build their engines,
    load a checkpoint: minutes at scale) killed it, nothing saved and no requeue; now every rank
    exits with 42 at the loop's start, nothing trained since `latest`, which stays as it was."""
    out = tmp_path / "run"
    args = base(uneven_shards, out, "stage.steps=4", "checkpoint.every=2")
    assert_ok(run_train(2, [*args, "stage.steps=2"]))
    done = run_train(2, args, DIT_INJECT_SIGNAL_AT_START="1")
    assert rank_exit_codes(done) == {42}, done.stdout[-3000:] + done.stderr[-3000:]
    assert "signalled before its first step, nothing new to save" in done.stderr
    assert latest_dir(out).name == "step_00000002"


def test_preemption_agreed_at_the_last_step_finishes_the_run(uneven_shards, tmp_path):
    """A run told of its preemption in its last step is done: it saves, draws its last grid and
    exits 0, instead of asking the scheduler for a job that would have nothing to train."""
    out = tmp_path / "run"
    done, _ = preempt_in_step_9(1, base(uneven_shards, out, "stage.steps=10", "checkpoint.every=4",
                                        "data.num_workers=1", "log.sample_every=0"), tmp_path / "saving")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "preempted" not in done.stdout
    assert latest_dir(out).name == "step_00000010"
    assert (out / "logs" / "samples" / "step_00000010.png").is_file()
