"""NaN on one rank: every rank skips that step together; K in a row stop the run with its own
exit code; no NaN ever reaches a checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.harness import (FP16_ON_CPU, assert_ok, base, ema_weights, final_weights, metrics,
                                   rank_exit_codes, run_train)

pytestmark = pytest.mark.slow


def all_finite(weights: dict) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("precision, fused", [("fp32", "null"), ("bf16", "true")])
def test_nan_on_one_rank_is_skipped_by_every_rank(uneven_shards, tmp_path, precision, fused):
    """In bf16 too, where DeepSpeed's own overflow check is off (trainer/optim.py): the guard alone.
    Both ways of skipping: the host's multi-tensor AdamW reads the flag and skips; the fused one
    (what CUDA gets) takes it as `found_inf`, and the step's skip is read a step late."""
    out = tmp_path / "run"
    assert_ok(run_train(2, base(uneven_shards, out, "stage.steps=6", "checkpoint.every=3", "log.every=2",
                                f"deepspeed.precision={precision}", f"optim.fused={fused}"), DIT_INJECT_NAN="1@3"))
    skipped = [r["step"] for r in metrics(out) if r.get("skipped_nonfinite_step")]
    assert skipped == [3]
    assert all_finite(final_weights(out)) and all_finite(ema_weights(out))


def test_nonfinite_steps_in_a_row_abort_with_their_exit_code(uneven_shards, tmp_path):
    """Logged every 4 steps with the fused AdamW: step 5's skip is read at the end of step 6 (a
    step late, so that no step waits for the device), which stops the run before step 6 is saved."""
    out = tmp_path / "run"
    proc = run_train(2, base(uneven_shards, out, "stage.steps=8", "stage.max_nonfinite_in_row=3",
                             "checkpoint.every=2", "log.every=4", "optim.fused=true"), DIT_INJECT_NAN="0@3,4,5")
    assert rank_exit_codes(proc) == {3}, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient (last at step 5)" in proc.stderr
    saved = sorted(Path(out / "checkpoints").glob("step_*"))
    assert [p.name for p in saved][-1] == "step_00000004"  # 2 and 4 saved; 5 stopped the run
    assert all_finite(final_weights(out)) and all_finite(ema_weights(out))


def test_an_fp16_loss_that_stays_nan_stops_at_the_scales_floor_pointing_to_bf16(uneven_shards, tmp_path):
    """A forward that overflows fp16 (here rank 1's loss NaN from step 3 on) is not helped by the
    loss scale: the scaler halves it to its floor (2^12 to 2 after the hysteresis) and then the run
    stops, every rank saying that the loss itself was not finite and bf16 has the range, not to
    lower the learning rate (rank 0's own losses were finite: the ranks agree by a collective)."""
    out = tmp_path / "run"
    proc = run_train(2, base(uneven_shards, out, "stage.steps=24", "deepspeed.precision=fp16", "log.sample_every=0",
                             "checkpoint.every=24"),
                     DIT_INJECT_NAN="1@" + ",".join(map(str, range(3, 25))), PYTHONPATH=str(FP16_ON_CPU))
    assert rank_exit_codes(proc) == {3}, proc.stderr[-3000:]
    said = proc.stderr
    assert said.count("steps in a row had a non-finite loss or gradient (the fp16 loss scale is at its floor)") == 2
    assert said.count("(deepspeed.precision=bf16 has float32's range)") == 2 and "Lower the learning rate" not in said


def test_samples_that_are_not_finite_skip_the_grid_and_the_eval_not_the_run(uneven_shards, tmp_path):
    """Samples drawn in training that hold NaN or inf (fp16 overflows past 65504; here a CFG
    scale that overflows fp32 too) were written as a black grid and judged to adherence 0, as if
    measured. Both are skipped now, logged as `nonfinite_samples` and said on stderr; the run goes on."""
    out = tmp_path / "run"
    proc = run_train(1, base(uneven_shards, out, "stage.steps=2", "checkpoint.every=2", "log.eval_every=2",
                             "log.sample_cfg=1e30", "log.sample_steps=2"))
    assert_ok(proc)
    records = metrics(out)
    assert sorted(r["nonfinite_samples"] for r in records if "nonfinite_samples" in r) == ["evaluation", "sample grid"]
    assert not [k for r in records for k in r if k.startswith("eval/") or k == "sample_grid"]
    assert not list(out.rglob("step_*.png"))
    assert "step 2: the sample grid was skipped" in proc.stderr and "log.sample_cfg" in proc.stderr
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
