"""Distillation stage objects in one process (no DeepSpeed): what the last round export of a
progressive run says it holds, what the stages log of a micro-batch of padding, and what the
adversarial discriminator is conditioned on. The exports and logs of real runs are checked in
test_distill_runs.py."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.eval.eval_helpers import tiny_config, write_checkpoint
from trainer.cascade import CascadeStageSpec, load_stage
from trainer.config import ConfigError, LogConfig
from trainer.diffusion import SamplerSettings
from trainer.metrics import MetricsLogger
from trainer.stages import build_stage, preflight
from trainer.stages.distillation import DistillationStage

DISTILL = ("stage.rounds=[2]", "diffusion.loss_weighting=trunc_snr")
UNGUIDED = "stage.guidance_max=1"  # a student without the guidance input learns one w: here 1, an unguided teacher


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
                      UNGUIDED, f"ema.enabled={ema}")
    stage = build_stage(cfg)
    stage.start_of_step(3, lambda: {})  # the last step
    weights = {k: v.detach().clone() for k, v in stage.players["student"].state_dict().items()}
    stage.write_samples(weights, LogConfig(), tmp_path / "grid.png")
    export = Path(cfg.checkpoint.dir) / "rounds" / "round_1_2steps"
    meta = json.loads((export / "round.json").read_text())
    assert (meta["steps"], meta["weights"]) == (2, label)
    # what `dit sample` and `dit export` record of it: they called an intermediate round's raw weights EMA
    assert load_stage(CascadeStageSpec(str(export)), SamplerSettings()).weights == label


def round_export(root: Path, teacher: Path, *overrides: str) -> Path:
    """A 2-step progressive student's checkpoint root (random weights), distilled from `teacher`."""
    return write_checkpoint(tiny_config(root, f"checkpoint.dir={root}/checkpoints", f"stage.teacher={teacher}",
                                        "stage.kind=progressive", "stage.rounds=[2]", *overrides))


@pytest.mark.parametrize("kind", ["progressive", "adversarial"])
def test_a_teacher_with_guidance_baked_in_cannot_teach_a_guidance_input(tmp_path, teacher, kind):
    """A distilled teacher without a guidance input gives targets that ignore w: a student's w
    trained on them would do nothing at `dit sample --cfg`, so the student is refused one."""
    baked = round_export(tmp_path / "round", teacher, UNGUIDED)
    cfg = tiny_config(tmp_path / "student", f"stage.teacher={baked}", f"stage.kind={kind}", "stage.rounds=[1]",
                      "diffusion.loss_weighting=trunc_snr", "model.guidance_embed=true")
    with pytest.raises(ConfigError, match="model.guidance_embed"):
        build_stage(cfg)
    with pytest.raises(ConfigError, match="model.guidance_embed"):  # and before any process starts
        preflight(cfg)


@pytest.mark.parametrize("kind", ["progressive", "adversarial"])
def test_a_distilled_teachers_guidance_range_bounds_the_students(tmp_path, teacher, kind):
    """A guidance-conditioned distilled teacher learned w on its own range: a student drawing w
    beyond it was taught the teacher's guesses there (accepted, and queried at w up to 8 for a
    teacher trained on [1, 2]); within it, accepted."""
    conditioned = round_export(tmp_path / "round", teacher, "model.guidance_embed=true", "stage.guidance_max=2",
                               "log.sample_cfg=2")
    student = (f"stage.teacher={conditioned}", f"stage.kind={kind}", "stage.rounds=[1]",
               "diffusion.loss_weighting=trunc_snr", "model.guidance_embed=true", "log.sample_cfg=2")
    with pytest.raises(ConfigError, match=r"'stage\.guidance_max': w=8 is outside \[1, 2\]"):
        preflight(tiny_config(tmp_path / "student", *student, "stage.guidance_max=8"))
    with pytest.raises(ConfigError, match=r"'stage\.guidance_min': w=0.5 is outside \[1, 2\]"):
        preflight(tiny_config(tmp_path / "student", *student, "stage.guidance_min=0.5", "stage.guidance_max=2"))
    preflight(tiny_config(tmp_path / "student", *student, "stage.guidance_min=1.5", "stage.guidance_max=2"))


def test_the_preflight_refuses_what_the_distillation_stages_refuse_once_started(tmp_path, teacher):
    """A student without the guidance input of its guidance-conditioned teacher, and a teacher
    sampler longer than the schedule (progressive: 2 x the first round; adversarial: the CFG
    teacher's log.sample_steps rounded up to a multiple of the student's steps, 1002 for 3 of
    1000), failed only once the ranks built their stages (the latter as a
    ValueError at the first loss)."""
    conditioned = round_export(tmp_path / "round", teacher, "model.guidance_embed=true")
    cfg = tiny_config(tmp_path / "student", f"stage.teacher={conditioned}", "stage.kind=progressive",
                      "stage.rounds=[1]", "diffusion.loss_weighting=trunc_snr", UNGUIDED)
    with pytest.raises(ConfigError, match="'model.guidance_embed'.*guidance-conditioned"):
        preflight(cfg)
    for kind, overrides, key in (("progressive", ["stage.rounds=[1024]"], "stage.rounds"),
                                 ("adversarial", ["stage.rounds=[3]", "log.sample_steps=1000"], "log.sample_steps")):
        cfg = tiny_config(tmp_path / kind, f"stage.teacher={teacher}", f"stage.kind={kind}", *overrides,
                          "diffusion.loss_weighting=trunc_snr", UNGUIDED)
        with pytest.raises(ConfigError, match=rf"'{key}'.*diffusion\.num_timesteps=1000"):
            preflight(cfg)


def test_an_adversarial_run_says_what_a_full_teachers_targets_are_sampled_with(tmp_path, teacher, capsys):
    """log.sample_steps, the grids' setting, is also the DDIM steps of a full (not distilled)
    teacher's targets: a few-step value meant for the student's grids made blurry targets
    without a word. The preflight says it; a distilled teacher samples with its own steps."""
    guided = ("stage.guidance_min=4", "stage.guidance_max=4")  # CFG at w = 4, baked into the student
    cfg = tiny_config(tmp_path / "adv", f"stage.teacher={teacher}", "stage.kind=adversarial", "stage.rounds=[4,2,1]",
                      "log.sample_steps=6", "diffusion.loss_weighting=trunc_snr", *guided)
    preflight(cfg)
    assert (f"stage.teacher {teacher} is a full diffusion model: its targets are 8-step DDIM samples with CFG "
            "(log.sample_steps=6, rounded up") in capsys.readouterr().out
    distilled = round_export(tmp_path / "round", teacher, *guided)
    preflight(tiny_config(tmp_path / "adv", f"stage.teacher={distilled}", "stage.kind=adversarial",
                          "stage.rounds=[2,1]", "log.sample_steps=6", "diffusion.loss_weighting=trunc_snr", *guided))
    assert "is a full diffusion model" not in capsys.readouterr().out


def batch(valid: list[bool], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed or len(valid))
    return {"image": torch.rand((len(valid), 3, 16, 16), generator=g) * 2 - 1, "caption": ["a red circle"] * len(valid),
            "valid": torch.tensor(valid)}


def logged_losses(stage, batches: list[dict], log_dir: Path) -> dict[str, float]:
    """The losses (and the discriminator's accuracy and mean logits) a log step records after
    these micro-batches."""
    logger = MetricsLogger(LogConfig(dir=str(log_dir), every=1, tensorboard=False), rank=0, total_steps=1,
                           start_step=0, samples_per_step=4)
    for b in batches:
        for _, _, info in stage.losses(b, torch.Generator().manual_seed(0)):
            logger.add(info)
    record = logger.step_done(1, {})
    logger.close()
    return {k: v for k, v in record.items() if k.startswith(("loss", "disc_acc", "logit"))}


@pytest.mark.parametrize("kind", ["progressive", "adversarial"])
def test_a_micro_batch_of_padding_is_left_out_of_the_logged_losses(tmp_path, teacher, kind):
    """The loader pads with repeats marked valid=False, and a micro-batch may be all padding: its
    losses (masked means: 0) must count in no logged mean, not pull each down by a 0, and the
    discriminator's mean logits leave its samples out (other pixels than the valid ones here)."""
    stage = build_stage(tiny_config(tmp_path, f"stage.teacher={teacher}", f"stage.kind={kind}", *DISTILL, UNGUIDED))
    alone = logged_losses(stage, [batch([True, True])], tmp_path / "alone")
    padded = logged_losses(stage, [batch([True, True]), batch([False, False], seed=7)], tmp_path / "padded")
    assert "loss" in alone and ("logit_fake" in alone) == (kind == "adversarial")
    assert padded == pytest.approx(alone)


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
                          *plain, "stage.guidance_min=4", "stage.guidance_max=4", f"diffusion.min_snr_gamma={gamma}")
        logged[gamma] = logged_losses(build_stage(cfg), [batch([True] * 4)], tmp_path / f"log{gamma}")[key]
    assert logged[0.05] < 0.9 * logged[50.0], logged  # min(SNR, gamma): the same samples (SNR 0.38 at t = 0.5), a lower cap


@pytest.mark.parametrize("distilled_teacher", [False, True])
def test_the_discriminator_of_a_guidance_conditioned_student_sees_the_guidance_scale(tmp_path, teacher,
                                                                                     distilled_teacher):
    """Real x_t' come from the teacher at each sample's w: a discriminator blind to w matches the
    student's samples to the mixture over w only. A trunk that embeds w (a distilled teacher's)
    carries it; a CFG teacher's does not, so the heads embed it."""
    if distilled_teacher:  # a guidance-conditioned 2-step student as the teacher
        teacher = round_export(tmp_path / "round", teacher, "model.guidance_embed=true")
    cfg = tiny_config(tmp_path / "adv", f"stage.teacher={teacher}", "stage.kind=adversarial", *DISTILL,
                      "model.guidance_embed=true")
    stage = build_stage(cfg)
    rollout = stage.rollout(batch([True, True]), [torch.Generator().manual_seed(i) for i in range(2)])
    at = lambda w: stage.disc_inputs(replace(rollout, scale=torch.full((2,), w)), 1)  # noqa: E731
    with torch.no_grad():
        logits = [stage.players["disc"](rollout.real, **at(w)) for w in (1.0, 4.0)]  # (B, heads) each
    assert not torch.allclose(*logits)
