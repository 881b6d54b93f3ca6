"""A rank killed mid-step, a rank failing its save, ranks disagreeing on the checkpoint: the
job ends within a bounded time with the cause named, and a relaunch ends bit-equal to the
uninterrupted reference run (weights, EMA and the samples each step consumed)."""
from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.data.data_helpers import dataset_keys
from tests.faults.conftest import REFERENCE
from tests.trainer.harness import (assert_ok, bare_ranks, base, ema_weights, final_weights, latest_dir, losses,
                                   rank_exit_codes, run_train, same_tensors, step_keys)
from trainer.checkpoint import TMP_PREFIX, load_for_inference

pytestmark = pytest.mark.slow

# A rank that loses its peer must not wait for the collective timeout (600 s by default): the
# launcher and gloo's closed connection end the job. A hang fails the test at this bound.
BOUND_S = 60


@pytest.fixture(scope="module")
def killed_then_resumed(uneven_shards, reference_run, tmp_path_factory):
    """Rank 1 SIGKILLs itself in the middle of step 7 (after its forward, while rank 0 waits in
    the gradient all-reduce); the same command is then run again."""
    out = tmp_path_factory.mktemp("killed") / "run"
    args = base(uneven_shards, out, *REFERENCE)
    crashed = run_train(2, args, timeout=BOUND_S + 60, DIT_INJECT_KILL_AT="1@7")
    ended = time.time()
    last_step_at = (out / "logs" / "metrics.jsonl").stat().st_mtime  # rank 0 logged step 6
    latest_after_crash = latest_dir(out).name
    resumed = run_train(2, args)
    return out, crashed, ended - last_step_at, latest_after_crash, resumed


def test_kill9_one_rank_mid_step_ends_the_job_and_the_relaunch_is_bit_equal(killed_then_resumed,
                                                                              reference_run):
    out, crashed, seconds_after_kill, latest_after_crash, resumed = killed_then_resumed
    output = crashed.stdout + crashed.stderr
    assert crashed.returncode != 0
    assert "SIGKILL" in output or "Signals.SIGKILL" in output, output[-3000:]
    assert seconds_after_kill < BOUND_S, seconds_after_kill
    print(f"job ended {seconds_after_kill:.1f} s after the last step before the kill")
    assert latest_after_crash == "step_00000004"
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a, b = losses(reference_run), losses(out)  # the resumed run's records come last
    assert [a[s] for s in range(5, 13)] == [b[s] for s in range(5, 13)]
    assert same_tensors(final_weights(reference_run), final_weights(out))


def test_without_a_launcher_the_survivor_stops_by_itself(uneven_shards, tmp_path):
    """No agent to stop the others (ranks on other nodes): gloo reports the lost peer."""
    ranks = bare_ranks(2, base(uneven_shards, tmp_path / "run", "stage.steps=8"), tmp_path / "logs",
                       DIT_INJECT_KILL_AT="1@3")
    try:
        killed = ranks[1].wait(timeout=BOUND_S + 60)
        died = time.monotonic()
        survivor = ranks[0].wait(timeout=BOUND_S)
        took = time.monotonic() - died
    finally:
        for proc in ranks:
            proc.kill()
    assert killed == -9 and survivor != 0
    assert re.search(r"Connection (reset|closed) by peer", (tmp_path / "logs" / "rank0.log").read_text())
    print(f"rank 0 exited {took:.1f} s after rank 1 was killed")


def test_exactly_once_data_across_a_mid_epoch_resume(killed_then_resumed, reference_run, uneven_shards):
    out = killed_then_resumed[0]
    keys = step_keys(out)
    assert sorted(keys) == [0, 1]
    assert all(sorted(steps) == list(range(1, 13)) for steps in keys.values())
    epoch = [k for steps in keys.values() for s in sorted(steps) for k in steps[s]]
    assert len(epoch) == len(set(epoch)) == 96  # no sample twice ...
    assert set(epoch) == dataset_keys(uneven_shards)  # ... and none missing
    assert keys == step_keys(reference_run)  # the same samples at the same steps on the same ranks


def test_ema_and_raw_weights_round_trip_and_sampling_uses_the_ema(killed_then_resumed, reference_run):
    out = killed_then_resumed[0]
    ema, raw = ema_weights(out), final_weights(out)
    assert same_tensors(ema, ema_weights(reference_run))
    assert same_tensors(raw, final_weights(reference_run))
    assert ema.keys() == raw.keys() and not same_tensors(ema, raw)  # decay 0.9: a real average
    _, weights = load_for_inference(out / "checkpoints")  # what `dit sample`/`dit export` load
    assert same_tensors(weights, ema)


def test_one_rank_failing_its_save_is_reported_without_a_hang(uneven_shards, tmp_path):
    out = tmp_path / "run"
    args = base(uneven_shards, out, "stage.steps=8", "checkpoint.every=4")
    start = time.monotonic()
    proc = run_train(2, args, timeout=BOUND_S + 60, DIT_INJECT_SAVE_ERROR="1@8:5")  # EIO on rank 1
    assert time.monotonic() - start < BOUND_S + 30
    assert rank_exit_codes(proc) == {4}, proc.stderr[-3000:]
    assert "could not write the checkpoint of step 8: it failed on rank(s) [1]" in proc.stderr
    assert "Input/output error" in proc.stderr
    assert latest_dir(out).name == "step_00000004"
    assert not (out / "checkpoints" / f"{TMP_PREFIX}step_00000008").exists()
    assert not (out / "checkpoints" / "step_00000008").exists()


def test_ranks_disagreeing_on_the_checkpoint_tag_are_refused(reference_run, uneven_shards, tmp_path):
    """A checkpoint directory that is not shared: rank 1 sees an older `latest`."""
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
    args = base(uneven_shards, out, *REFERENCE, "stage.steps=16")
    proc = run_train(2, args, timeout=BOUND_S + 60, DIT_INJECT_LATEST="1@step_00000008")
    assert rank_exit_codes(proc) == {4}, proc.stderr[-3000:]
    assert "ranks disagree on the checkpoint to resume from (rank 0: step_00000012, rank 1: " \
           "step_00000008)" in proc.stderr
    assert "shared by every node" in proc.stderr
    assert latest_dir(out).name == "step_00000012"
