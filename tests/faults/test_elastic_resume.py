"""Elastic resume: the reference run (2 ranks, ZeRO-2, one epoch of 96 samples in 12 steps of 8)
continued from its step-8 checkpoint on another layout.

- 2 ranks -> 1 rank (`dit launch --max-restarts`; grad_accum 2, derived; no loader worker) ->
  2 ranks as 2 pipeline stages (ZeRO-1, grad_accum 2): every sample of the epoch is consumed
  exactly once over the three jobs, and the weights end where the uninterrupted run's do up to
  rounding: each step takes the same samples on any layout (data_pipeline/plan.py) and each
  sample draws the same noise, timestep and CFG mask (trainer/diffusion/noise.py), so only the
  summation order of the gradients differs (see the bound below).
- ZeRO-2 -> ZeRO-3 (both offloads) -> ZeRO-2 (optimizer offload) on 2 ranks: the same samples
  and noise as the uninterrupted run, so each step's loss equals its loss up to the summation
  order of the reductions (and DeepSpeed's CPU Adam against torch's AdamW).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import REFERENCE
from tests.faults.test_resume_shape import launch
from tests.trainer.harness import assert_ok, base, latest_dir, losses, run_train, step_keys

pytestmark = pytest.mark.slow

SAMPLES_PER_EPOCH = 96


def from_step(reference: Path, step: int, out: Path) -> Path:
    """A run directory holding the reference run's checkpoint of `step` as its `latest`, and its
    sample-key logs up to that step (what the run had audited when it stopped there)."""
    from trainer.checkpoint import LATEST, step_name

    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / step_name(step), out / "checkpoints" / step_name(step))
    (out / "checkpoints" / LATEST).write_text(step_name(step))
    (out / "logs" / "keys").mkdir(parents=True)
    for path in (reference / "logs" / "keys").glob("rank_*.jsonl"):
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        (out / "logs" / "keys" / path.name).write_text("".join(f"{line}\n" for line in kept))
    return out


def fp32_weights_of(directory: Path) -> dict[str, torch.Tensor]:
    """The student's fp32 master weights of a checkpoint, by the network's names."""
    tensors = load_file(str(directory / "universal_student.safetensors"))
    return {k.removeprefix("fp32/"): v for k, v in tensors.items() if k.startswith("fp32/")}


def fp32_weights(out: Path) -> dict[str, torch.Tensor]:
    return fp32_weights_of(latest_dir(out))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def mean_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return sum(float((a[k] - b[k]).abs().sum()) for k in a) / sum(v.numel() for v in a.values())


def test_two_ranks_to_one_to_two_pipeline_stages_sees_each_sample_once(reference_run, uneven_shards, tmp_path):
    out = from_step(reference_run, 8, tmp_path / "elastic")
    one = launch(1, base(uneven_shards, out, *REFERENCE, "stage.steps=10", "data.num_workers=0"), "--max-restarts=1")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "continuing with derived 1 data-parallel rank(s) x data.batch_size 4 x deepspeed.grad_accum 2 = " \
           "global batch 8" in one.stdout
    pipe = run_train(2, base(uneven_shards, out, *REFERENCE, "deepspeed.pipeline_stages=2", "deepspeed.zero_stage=1"))
    assert_ok(pipe)
    assert "ZeRO-1, 2 pipeline stage(s)" in pipe.stdout and "deepspeed.grad_accum 2" in pipe.stdout
    assert latest_dir(out).name == "step_00000012"

    seen = [key for steps in step_keys(out).values() for s, keys in steps.items() if s <= 12 for key in keys]
    assert len(seen) == SAMPLES_PER_EPOCH and len(set(seen)) == SAMPLES_PER_EPOCH
    assert sorted(seen) == sorted(k for steps in step_keys(reference_run).values() for keys in steps.values()
                                  for k in keys)

    # Both runs start step 9 from the same weights and moments, and steps 9-12 see the same
    # samples in the same micro-batches of 4 with the same draws: only the order of the fp32
    # gradient sums differs (2 ranks' all-reduce against 1 rank's accumulation, pipeline stages),
    # as with the ZeRO-2 <-> ZeRO-3 switch below (measured there: 6.0e-8). That perturbs a
    # gradient by a few float32 eps relatively; AdamW's m_hat / sqrt(v_hat) is scale-free, so the
    # update changes by ~lr x 1e-7, and where two updates differ the sum w + dw may round to the
    # neighbouring float: at most an ulp of |w| <= eps x |w| per step, so 4 x eps x max|w| after
    # 4 steps; on average below eps x mean|w|. Measured: 5.96e-8 at most (one ulp of a weight in
    # [0.5, 1)), 1.8e-11 on average.
    # Before steps took layout-dependent samples and per-rank noise the difference was 5.3e-3;
    # weights not restored (fresh init, a pipeline stage's layers under the wrong names) are
    # off by the initialisation's scale.
    elastic, reference = fp32_weights(out), fp32_weights(reference_run)
    before = fp32_weights_of(reference_run / "checkpoints" / "step_00000008")
    difference, moved = max_difference(elastic, reference), mean_difference(reference, before)
    bound = 4 * torch.finfo(torch.float32).eps * max(float(w.abs().max()) for w in reference.values())
    print(f"elastic chain vs uninterrupted after step 12: max |w - w_ref| {difference:.3g} (bound {bound:.3g}), "
          f"mean {mean_difference(elastic, reference):.3g}; the reference's mean movement over steps 9-12 {moved:.3g}")
    assert difference <= bound
    zero = {k: torch.zeros_like(w) for k, w in reference.items()}
    assert mean_difference(elastic, reference) <= torch.finfo(torch.float32).eps * mean_difference(reference, zero)


def test_zero_stage_changes_keep_the_loss_of_the_uninterrupted_run(reference_run, uneven_shards, tmp_path):
    """With both offloads at ZeRO-3 and the optimizer's at ZeRO-2 on the way: the engine's own
    gradient buffers survive the state's re-partitioning (ZeRO-Offload's pinned host buffer,
    dropped, failed the first backward of every resume onto an offload layout)."""
    out = from_step(reference_run, 8, tmp_path / "zero")
    offload = ("deepspeed.offload_optimizer=true",)
    assert_ok(run_train(2, base(uneven_shards, out, *REFERENCE, "stage.steps=10", "deepspeed.zero_stage=3",
                                *offload, "deepspeed.offload_params=true")))
    assert_ok(run_train(2, base(uneven_shards, out, *REFERENCE, *offload)))  # ZeRO-2 from ZeRO-3's step 10
    resumed, reference = losses(out), losses(reference_run)
    relative = {s: abs(resumed[s] - reference[s]) / reference[s] for s in (9, 10, 11, 12)}
    print(f"ZeRO-2 -> ZeRO-3 -> ZeRO-2, relative loss difference per step: {relative}")
    # Same samples, same noise, exact fp32 masters and moments: only the order of the fp32
    # reductions differs (ZeRO-3's reduce-scatter against ZeRO-2's), a few ulp (~1e-7) per step.
    # Measured: the losses equal, the weights within 6.0e-8 (one ulp of a weight in [0.5, 1)).
    # Moments or step counts not restored change the steps after the resume by ~lr = 1e-3.
    assert max(relative.values()) < 1e-6
    difference = max_difference(fp32_weights(out), fp32_weights(reference_run))
    print(f"ZeRO switches vs uninterrupted, max |w - w_ref| after step 12: {difference:.3g}")
    assert difference < 1e-6
