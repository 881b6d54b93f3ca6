"""Mixed precision and ZeRO-Offload on 2 real ranks over gloo (DeepSpeed's CPU accelerator runs
bf16 and its CPU Adam here): they learn, resume bit-exactly, and keep the promise that a
non-finite gradient on any rank is skipped by every rank."""
from __future__ import annotations

import pytest
import torch

from tests.trainer.harness import (FP16_ON_CPU, assert_checkpoint_samples_match, ema_weights, final_weights, losses,
                                   metrics, same_tensors, straight_and_resumed)

pytestmark = pytest.mark.slow


def mean_loss(curve: dict[int, float], steps: range) -> float:
    return sum(curve[s] for s in steps) / len(steps)


def test_bf16_trains_and_resumes_bit_exact(shapes_shards, tmp_path):
    straight, resumed = straight_and_resumed(shapes_shards, tmp_path, 24, "deepspeed.precision=bf16",
                                             "optim.lr=2e-3", "log.sample_every=0")
    weights = final_weights(straight)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}  # really bf16
    assert {v.dtype for v in ema_weights(straight).values()} == {torch.float32}  # EMA kept in fp32
    curve = losses(straight)
    assert mean_loss(curve, range(17, 25)) < 0.8 * mean_loss(curve, range(1, 9)), curve
    assert same_tensors(weights, final_weights(resumed))
    assert same_tensors(ema_weights(straight), ema_weights(resumed))
    assert_checkpoint_samples_match(resumed, tmp_path)


@pytest.mark.parametrize("offload", [["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"],
                                     ["deepspeed.zero_stage=3", "deepspeed.offload_params=true",
                                      "deepspeed.offload_optimizer=true"]],
                         ids=["zero2-optimizer", "zero3-params"])
def test_offload_trains_and_resumes_exactly_and_skips_a_nan_on_one_rank(shapes_shards, tmp_path, offload):
    """A NaN injected on rank 1 at step 3 (in the straight run and in the first half of the
    resumed one) is skipped by both ranks: CPU Adam runs behind the same finite guard."""
    straight, resumed = straight_and_resumed(shapes_shards, tmp_path, 8, *offload, "log.sample_every=0",
                                             DIT_INJECT_NAN="1@3")
    curve = losses(straight)
    assert len(curve) == 7 and all(v == v for v in curve.values())  # step 3 skipped, not logged
    assert [r["step"] for r in metrics(straight) if r.get("skipped_nonfinite_step")] == [3]
    assert all(torch.isfinite(v).all() for v in ema_weights(straight).values())
    assert same_tensors(ema_weights(straight), ema_weights(resumed))
    assert losses(resumed)[8] == curve[8]
    assert_checkpoint_samples_match(resumed, tmp_path)


def test_fp16_with_loss_scaling_trains_resumes_and_skips_a_nan_on_one_rank(shapes_shards, tmp_path):
    """fp16 with DeepSpeed's dynamic loss scaling: DeepSpeed's CPU accelerator refuses fp16 without
    AVX512-FP16, so the ranks start with its fp16 flag set (fp16_on_cpu/sitecustomize.py) and
    everything else is real: DeepSpeed's fp16 ZeRO-2 optimizer, its loss scaler and overflow test,
    our finite guard. The weights are fp16, the EMA fp32; NaNs on rank 1 at steps 2-4 are skipped
    by both ranks, as overflows: the loss scaler's search (hysteresis, then halving), which a run
    whose gradients overflow at the first scales goes through too, so three in a row no longer
    stop the run at the default stage.max_nonfinite_in_row; the resume (loss scaler included)
    is exact."""
    straight, resumed = straight_and_resumed(shapes_shards, tmp_path, 8, "deepspeed.precision=fp16", "optim.lr=2e-3",
                                             "log.sample_every=0", DIT_INJECT_NAN="1@2,3,4",
                                             PYTHONPATH=str(FP16_ON_CPU))
    weights = final_weights(straight)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}  # really fp16
    assert {v.dtype for v in ema_weights(straight).values()} == {torch.float32}
    curve = losses(straight)
    assert len(curve) == 5 and all(v == v for v in curve.values())  # steps 2-4 skipped, not logged
    overflows = [r for r in metrics(straight) if r.get("skipped_nonfinite_step")]
    assert [(r["step"], r.get("loss_scale_overflow")) for r in overflows] == [(2, 1), (3, 1), (4, 1)]
    scales = {r["step"]: r["loss_scale"] for r in metrics(straight) if "loss_scale" in r}
    assert scales == {1: 4096.0, 2: 4096.0, 3: 2048.0, **{s: 1024.0 for s in range(4, 9)}}  # 2^12, hysteresis 2
    assert same_tensors(weights, final_weights(resumed))
    assert same_tensors(ema_weights(straight), ema_weights(resumed))
    assert {s: curve[s] for s in range(5, 9)} == losses(resumed)
