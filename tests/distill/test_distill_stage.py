"""Distillation stage objects in one process (no DeepSpeed): what the last round export of a
progressive run says it holds, and what the stages log of a micro-batch of padding. The
exports and logs of real runs are checked in test_distill_runs.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.config import LogConfig
from trainer.metrics import MetricsLogger
from trainer.stages import build_stage
from trainer.stages.distillation import DistillationStage

DISTILL = ("stage.rounds=[2]", "diffusion.loss_weighting=trunc_snr")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint root (random weights)."""
    root = tmp_path_factory.mktemp("teacher")
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints"))


@pytest.mark.parametrize("ema, label", [("true", "ema"), ("false", "raw")])
def test_last_round_export_names_the_weights_it_holds(tmp_path, teacher, monkeypatch, ema, label):
    """The engine hands `write_samples` the EMA weights, or the raw ones where no EMA is kept;
    the last round's export must not call raw weights EMA."""
    monkeypatch.setattr(DistillationStage, "write_samples", lambda *args: None)  # the grid is not under test
    cfg = tiny_config(tmp_path, f"stage.teacher={teacher}", "stage.kind=progressive", *DISTILL, "stage.steps=4",
                      f"ema.enabled={ema}")
    stage = build_stage(cfg)
    stage.start_of_step(3, lambda: {})  # the last step
    weights = {k: v.detach().clone() for k, v in stage.players["student"].state_dict().items()}
    stage.write_samples(weights, LogConfig(), tmp_path / "grid.png")
    meta = json.loads((Path(cfg.checkpoint.dir) / "rounds" / "round_1_2steps" / "round.json").read_text())
    assert (meta["steps"], meta["weights"]) == (2, label)


def batch(valid: list[bool]) -> dict:
    g = torch.Generator().manual_seed(len(valid))
    return {"image": torch.rand((len(valid), 3, 16, 16), generator=g) * 2 - 1, "caption": ["a red circle"] * len(valid),
            "valid": torch.tensor(valid)}


def logged_losses(stage, batches: list[dict], log_dir: Path) -> dict[str, float]:
    """The losses (and discriminator accuracy) a log step records after these micro-batches."""
    logger = MetricsLogger(LogConfig(dir=str(log_dir), every=1, tensorboard=False), rank=0, total_steps=1,
                           start_step=0, samples_per_step=4)
    for b in batches:
        for _, _, info in stage.losses(b, torch.Generator().manual_seed(0)):
            logger.add(info)
    record = logger.step_done(1, {})
    logger.close()
    return {k: v for k, v in record.items() if k.startswith(("loss", "disc_acc"))}


@pytest.mark.parametrize("kind", ["progressive", "adversarial"])
def test_a_micro_batch_of_padding_is_left_out_of_the_logged_losses(tmp_path, teacher, kind):
    """The loader pads with repeats marked valid=False, and a micro-batch may be all padding: its
    losses (masked means: 0) must count in no logged mean, not pull each down by a 0."""
    stage = build_stage(tiny_config(tmp_path, f"stage.teacher={teacher}", f"stage.kind={kind}", *DISTILL))
    alone = logged_losses(stage, [batch([True, True])], tmp_path / "alone")
    padded = logged_losses(stage, [batch([True, True]), batch([False, False])], tmp_path / "padded")
    assert "loss" in alone and padded == pytest.approx(alone)


@pytest.mark.parametrize("kind, key", [("progressive", "loss"), ("adversarial", "loss_mse")])
def test_the_configured_min_snr_gamma_weighs_the_distillation_loss(tmp_path, kind, key):
    """diffusion.min_snr_gamma reaches the students' loss (min_snr is allowed without zero
    terminal SNR): the stages called it with the default gamma 5 whatever was configured."""
    plain = ("diffusion.zero_terminal_snr=false", "diffusion.loss_weighting=min_snr")
    root = tmp_path / "teacher"
    teacher = write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints", *plain))
    logged = {}
    for gamma in (0.05, 50.0):
        cfg = tiny_config(tmp_path / f"g{gamma}", f"stage.teacher={teacher}", f"stage.kind={kind}", "stage.rounds=[2]",
                          *plain, f"diffusion.min_snr_gamma={gamma}")
        logged[gamma] = logged_losses(build_stage(cfg), [batch([True] * 4)], tmp_path / f"log{gamma}")[key]
    assert logged[0.05] < 0.9 * logged[50.0], logged  # min(SNR, gamma): the same samples (SNR 0.38 at t = 0.5), a lower cap
