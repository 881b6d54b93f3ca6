"""Resumes that change what the checkpoint holds besides the weights and moments: the optimizer
settings the config asks for (with --allow-config-change) are the ones trained with, on the
checkpoint's layout and on another; and an elastic fp16 resume keeps the loss scaler's state
as a same-layout resume does. One or two steps each, from the fault suite's reference run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import REFERENCE
from tests.faults.test_resume_shape import copied  # noqa: F401  (fixture)
from tests.trainer.harness import FP16_ON_CPU, assert_ok, base, latest_dir, metrics, run_train

pytestmark = pytest.mark.slow


# The reference trains with lr 1e-3 (constant after 2 warm-up steps), betas (0.9, 0.999), eps
# 1e-8, no weight decay, clipping at 1.0 and grad_accum 1: each of them changed.
CHANGES = {"optim.lr": ("0.001", "0.0002"), "optim.betas": ("[0.9, 0.999]", "[0.8, 0.95]"),
           "optim.eps": ("1e-08", "1e-06"), "optim.weight_decay": ("0.0", "0.05"),
           "optim.grad_clip": ("1.0", "0.25"), "deepspeed.grad_accum": ("1", "2")}
OVERRIDES = ["optim.lr=2e-4", "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "optim.weight_decay=0.05",
             "optim.grad_clip=0.25", "deepspeed.grad_accum=2", "checkpoint.allow_config_change=true"]


def rank0_optimizer(directory: Path) -> dict:
    """Rank 0's DeepSpeed optimizer state of the student in a checkpoint (what its job ran with)."""
    path = directory / "student" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    return torch.load(path, weights_only=False)["optimizer_state_dict"]


def param_groups(optimizer: dict) -> list[dict]:
    """The wrapped AdamW's parameter groups (ZeRO-1/2 and ZeRO-3 file them under different keys)."""
    inner = optimizer.get("base_optimizer_state") or optimizer["optimizer_state_dict"]
    return inner["param_groups"]


def rank0_meta(directory: Path) -> dict:
    return json.loads((directory / "rank_00000.json").read_text())


@pytest.mark.parametrize("layout", [[], ["deepspeed.zero_stage=3"]], ids=["same-layout", "elastic-zero3"])
def test_allow_config_change_trains_with_the_new_optimizer_settings(copied, uneven_shards, layout):  # noqa: F811
    """The checkpoint's LR scheduler, optimizer and DeepSpeed wrapper states hold the old
    settings; the resumed job trains with the config's (and says which keys changed), keeping
    the schedule's position and the moments."""
    proc = run_train(2, base(uneven_shards, copied, *REFERENCE, "stage.steps=13", *OVERRIDES, *layout))
    assert_ok(proc)
    listed = [line for line in proc.stdout.splitlines() if "resuming with a changed config" in line]
    assert sorted(listed) == sorted(f"dit train: resuming with a changed config: {key}: {old} -> {new}"
                                    for key, (old, new) in CHANGES.items()), proc.stdout[-3000:]
    assert [r["lr"] for r in metrics(copied) if r.get("step") == 13 and "lr" in r] == [2e-4]
    step = latest_dir(copied)
    assert step.name == "step_00000013"
    meta = rank0_meta(step)
    assert meta["global_batch"] == 16  # 2 ranks x 4 x grad_accum 2
    assert meta["batch_request"] == [4, 2]  # what now sets the global batch (trainer/elastic.py BatchRequest)
    scheduler = meta["optimizers"]["student"]["scheduler"]
    assert (scheduler["base_lrs"], scheduler["last_epoch"]) == ([2e-4], 13)
    assert meta["optimizers"]["student"]["optimizer_step"] == 13
    optimizer = rank0_optimizer(step)
    assert {(tuple(g["betas"]), g["eps"], g["weight_decay"], g["lr"]) for g in param_groups(optimizer)} == {
        ((0.8, 0.95), 1e-6, 0.05, 2e-4)}
    assert optimizer.get("clip_grad", 0.25) == 0.25  # ZeRO-3 does not save (nor restore) it


def test_an_elastic_fp16_resume_keeps_the_loss_scale(uneven_shards, tmp_path):
    """fp16 (fp16_on_cpu) on 2 ranks, ZeRO-2: a NaN on rank 1 at step 3 is an overflow to
    DeepSpeed's dynamic loss scaler, which spends one unit of hysteresis on it. Resumed from step
    4 on ZeRO-1 (another layout: the universal files), the scaler goes on from its state (the
    overflow's step, the hysteresis left, its iteration count) as it does on the same layout;
    a fresh one would count from 0 with its hysteresis refilled."""
    out = tmp_path / "run"
    fp16 = ["deepspeed.precision=fp16", "checkpoint.every=4", "log.sample_every=0"]
    assert_ok(run_train(2, base(uneven_shards, out, *fp16, "stage.steps=4"),
                        DIT_INJECT_NAN="1@3", PYTHONPATH=str(FP16_ON_CPU)))
    saved = rank0_meta(latest_dir(out))["optimizers"]["student"]["loss_scaler"]
    assert (saved["cur_iter"], saved["last_overflow_iter"], saved["cur_hysteresis"]) == (4, 2, 1)
    assert_ok(run_train(2, base(uneven_shards, out, *fp16, "stage.steps=5", "deepspeed.zero_stage=1"),
                        PYTHONPATH=str(FP16_ON_CPU)))
    scaler = rank0_optimizer(latest_dir(out))["loss_scaler"]
    assert (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis) == (
        saved["cur_scale"], 5, 2, 1)


def test_allow_config_change_for_another_key_still_keeps_the_global_batch(copied, uneven_shards):  # noqa: F811
    """The 2-rank fp32 reference (global batch 8) resumed on 1 rank in bf16 with the flag given
    for the precision: the global batch is still kept (grad_accum 2 derived; the flag let it
    fall to 4 before), and the precision, which DeepSpeed's fp32 files do not fit, resumes from
    the universal files."""
    proc = run_train(1, base(uneven_shards, copied, *REFERENCE, "stage.steps=13", "deepspeed.precision=bf16",
                             "checkpoint.allow_config_change=true"))
    assert_ok(proc)
    assert "dit train: resuming with a changed config: deepspeed.precision: 'fp32' -> 'bf16'" in proc.stdout
    derived = "derived 1 data-parallel rank(s) x data.batch_size 4 x deepspeed.grad_accum 2 = global batch 8"
    assert derived in proc.stdout
    meta = rank0_meta(latest_dir(copied))
    assert (meta["global_batch"], meta["batch_request"], meta["optimizers"]["student"]["optimizer_step"]) == (
        8, [4, 1], 13)
