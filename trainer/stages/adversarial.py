"""Adversarial distillation into a 1-4 step sampler (SDXL-Lightning, Lin et al. 2024,
"SDXL-Lightning: Progressive Adversarial Diffusion Distillation"; LADD, Sauer et al. 2024).

The student maps x_t to x_t' in one DDIM step of an N-step trailing sampler, N taken from
`stage.rounds` in turn, step by step (e.g. [4, 2, 1]: one network samples at 1, 2 and 4
steps). The teacher reaches x_t' with many DDIM steps (with CFG at a per-sample scale w, or its
own few steps when it is itself distilled; otherwise `log.sample_steps` when the run starts,
which a resume keeps: a log.* change alters what is logged, not what is trained). The
discriminator is the frozen teacher trunk with trainable heads (`DiscriminatorHeads`) reading
x_t' at t' (and, for a guidance-conditioned student, the sample's guidance scale w: the real x_t'
depend on it); it is the second player, with its own optimizer:

    conditional phase (the first half of stage.steps when the run starts; a resume keeps its
        length): D judges the pair (x_t, x_t'): the heads read the trunk's token features of x_t'
        minus those of x_t, so the student must preserve the teacher's flow from each x_t
        (SDXL-Lightning sec. 3.2);
    unconditional phase: D judges x_t' alone, which relaxes the flow-preservation that makes
        few-step samples blurry (their sec. 3.3).

Losses (per head, averaged): hinge (Lim & Ye 2017) or non-saturating (Goodfellow et al. 2014),
plus `stage.adv_mse_weight` times the progressive-style x0 regression to the teacher's landing
point (`ddim_x0_target`, weighted by `diffusion.loss_weighting`). The student step runs before
the discriminator's loss is computed on the same batch (teacher = real, student = fake).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.bundle import frozen
from trainer.config import ConfigError, DataConfig, DiffusionConfig, ModelConfig, RunConfig
from trainer.diffusion import add_noise, ddim_x0_target, randn
from trainer.diffusion.distill import (
    ddim_from_prediction,
    ddim_path,
    distill_loss,
    draw_guidance,
    draw_student_steps,
    masked_mean,
    student_step_times,
    valid_weight,
)
from trainer.metrics import valid_mean
from trainer.models.discriminator import DiscriminatorHeads
from trainer.models.dit import DiT, TextEmbedding
from trainer.stage_config import AdversarialSettings
from trainer.stages.base import PlayerLoss
from trainer.stages.checks import check_adversarial, check_conditional_phase
from trainer.stages.distillation import DistillationStage

CONDITIONAL_FRACTION = 0.5  # share of stage.steps with the conditional discriminator


# ------------------------------------------------------------------------------- losses


def discriminator_loss(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    """Hinge: relu(1 - D(real)) + relu(1 + D(fake)); non-saturating: softplus(-D(real)) +
    softplus(D(fake)); averaged over the heads. Logits (B, heads) -> (B,)."""
    if kind == "hinge":
        return (F.relu(1 - real) + F.relu(1 + fake)).mean(1)
    if kind == "non_saturating":
        return (F.softplus(-real) + F.softplus(fake)).mean(1)
    raise ConfigError("stage.adv_loss", f"'{kind}' is not one of hinge, non_saturating")


def generator_loss(fake: Tensor, kind: str) -> Tensor:
    """Hinge: -D(fake); non-saturating: softplus(-D(fake)); averaged over the heads.
    Logits (B, heads) -> (B,)."""
    if kind == "hinge":
        return -fake.mean(1)
    if kind == "non_saturating":
        return F.softplus(-fake).mean(1)
    raise ConfigError("stage.adv_loss", f"'{kind}' is not one of hinge, non_saturating")


def discriminator_accuracy(real: Tensor, fake: Tensor, weight: Tensor) -> Tensor:
    """Share of the valid samples (weight 1) that the head-averaged logit classifies right
    (real > 0, fake < 0); 0.5 is chance. Logits (B, heads), weight (B,)."""
    right = (real.mean(1) > 0).to(weight.dtype) + (fake.mean(1) < 0).to(weight.dtype)  # (B,) in {0, 1, 2}
    return masked_mean(right, weight) / 2


# ------------------------------------------------------------------------------- the discriminator


class PairDiscriminator(nn.Module):
    """D(x_t', t', text [, x_t, t] [, guidance]) -> logits (B, heads) on `DiscriminatorHeads`.

    Unconditional: the heads read the frozen trunk's token features of x_t'. Conditional
    (SDXL-Lightning's D(x_t, x_t')): they read features(x_t') - features(x_t), token by token
    (the tokens of both inputs sit on the same patch grid), so the logit depends on where the
    step went from x_t; the reference features carry no gradient (x_t is data)."""

    def __init__(self, heads: DiscriminatorHeads):
        super().__init__()
        self.disc = heads

    def features(self, x: Tensor, t: Tensor, text: TextEmbedding, **extras: Tensor) -> tuple[list[Tensor], Tensor]:
        """Token features (B, N, D) of the judged blocks, and the conditioning c (B, D)."""
        return self.disc.trunk.block_features(x, t, text, self.disc.block_ids, **extras)

    def forward(self, x_next: Tensor, *, t_next: Tensor, text: TextEmbedding, x_t: Optional[Tensor] = None,
                t: Optional[Tensor] = None, **extras: Tensor) -> Tensor:
        features, c = self.features(x_next, t_next, text, **extras)
        c = self.disc.condition(c, extras.get("guidance"))  # (B, D)
        if x_t is not None and t is not None:
            with torch.no_grad():
                reference, _ = self.features(x_t, t, text, **extras)
            features = [h - r for h, r in zip(features, reference)]
        return torch.stack([head(h, c) for head, h in zip(self.disc.heads, features)], dim=1)  # (B, heads)


def head_block_ids(depth: int) -> list[int]:
    """Blocks read by the heads: a quarter, half, three quarters of the way and the last
    (LADD reads several depths of the teacher)."""
    return sorted({depth // 4, depth // 2, (3 * depth) // 4, depth - 1})


def discriminator_heads(trunk: DiT, student_guidance: bool) -> DiscriminatorHeads:
    """The heads on `trunk` (a frozen copy of the teacher) that the stage trains. The guidance
    scale w of a guidance-conditioned student reaches them through a trunk that embeds it (a
    distilled teacher's), else through their own embedding of it (a teacher sampled with CFG)."""
    return DiscriminatorHeads(trunk, head_block_ids(len(trunk.blocks)),
                              guidance=student_guidance and not trunk.spec.guidance)


@contextmanager
def no_param_grads(module: nn.Module) -> Iterator[None]:
    """The generator's pass through D: gradients reach D's input, not its parameters. The stage
    calls the plain module here, not its DeepSpeed engine: an engine's forward arms that engine's
    backward epilogue (the gradient all-reduce), which must run only for D's own loss."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def repeat_text(text: TextEmbedding, times: int) -> TextEmbedding:
    return TextEmbedding(*(torch.cat([part] * times) for part in text))


# ------------------------------------------------------------------------------- the stage


@dataclass
class Rollout:
    """One batch of student steps: x_t at t, the teacher's x at t' ("real"), the conditioning."""

    x_t: Tensor  # (B, ...)
    t: Tensor  # (B,)
    t_next: Tensor  # (B,)
    real: Tensor  # (B, ...)
    text: TextEmbedding
    scale: Tensor  # (B,) guidance scale w
    weight: Tensor  # (B,) 0 for the loader's padding repeats
    steps: int  # N of the N-step sampler this batch trains


class AdversarialStage(DistillationStage):
    """Players: "student" (the few-step sampler) and "disc" (heads on the frozen teacher trunk).

    `teacher_steps`: the DDIM steps over [0, 1] of a teacher that is a full diffusion model
    (rounded up to a multiple of every student step count); the trainer passes
    `log.sample_steps`, the teacher sampler the sample grids show. Both it and the conditional
    phase's length (from `stage.steps`) are kept in the stage state: a resume trains on with the
    schedule the run started with (`keep_schedule`)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, settings: AdversarialSettings) -> "AdversarialStage":
        return cls(cfg.model, cfg.diffusion, settings, cfg.data, cfg.log.sample_steps)

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: AdversarialSettings, data: DataConfig,
                 teacher_steps: int = 32):
        super().__init__(model, diffusion, stage, data)
        self.step_counts, self.teacher_steps = check_adversarial(stage, self.teacher.steps, teacher_steps,
                                                                 diffusion.num_timesteps)
        self.conditional_steps = int(CONDITIONAL_FRACTION * stage.steps)
        trunk = frozen(copy.deepcopy(self.teacher.net))
        self.players["disc"] = PairDiscriminator(discriminator_heads(trunk, model.guidance_embed))

    def frozen_copies(self) -> list[tuple[nn.Module, nn.Module]]:
        """The trunk is the teacher the run distils: on a resume the one it started with, which
        `keep_teacher` may have loaded in place of the one `stage.teacher` resolves to now."""
        return [(self.players["disc"].disc.trunk, self.teacher.net)]

    @property
    def conditional(self) -> bool:
        return self.step < self.conditional_steps

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "conditional_steps": torch.tensor(self.conditional_steps),
                "teacher_steps": torch.tensor(self.teacher_steps)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(tensors)
        if "conditional_steps" in tensors:
            self.keep_schedule(int(tensors["conditional_steps"]), int(tensors["teacher_steps"]))

    def keep_schedule(self, conditional_steps: int, teacher_steps: int) -> None:
        """What the run started with: the conditional phase's length (a changed `stage.steps`
        moves the end of the unconditional phase; the discriminator never goes back to the
        conditional one) and the teacher's sampler (`log.sample_steps` changes the grids only)."""
        check_conditional_phase(conditional_steps, self.stage_cfg.steps)
        if conditional_steps != self.conditional_steps:
            self.note(f"the conditional phase keeps the {conditional_steps} steps this run started with")
        if teacher_steps != self.teacher_steps:
            self.note(f"the teacher's targets keep the {teacher_steps}-step sampler this run started with "
                      f"(log.sample_steps now asks for {self.teacher_steps}: it sets the sample grids' teacher row)")
        self.conditional_steps, self.teacher_steps = conditional_steps, teacher_steps

    def rollout(self, batch: dict[str, Any], generator: torch.Generator) -> Rollout:
        """x_t at a random step k of an N-step sampler (N cycled from stage.rounds), and where the
        teacher's path over that step lands (the "real" x_t')."""
        x0 = self.clean_input(batch)  # (B, C, h, w) or (B, C, F, h, w)
        text = self.condition(batch, generator)
        B = x0.shape[0]
        scale = draw_guidance(self.stage_cfg.guidance_min, self.stage_cfg.guidance_max, B, generator, x0.device)  # (B,)
        # N cycles through the step counts step by step: every rank trains the same N at once
        # (equal teacher paths, so no rank waits on another), decided without a device read.
        n = self.step_counts[self.step % len(self.step_counts)]
        k = draw_student_steps(n, B, generator, x0.device)  # (B,)
        schedule = self.schedule_for(x0.shape[1:])  # the SNR shift of this batch's bucket
        times = student_step_times(schedule, n, self.teacher_steps // n, k)
        alpha, sigma = schedule.alpha_sigma(times[0])  # (B,), (B,)
        x_t = add_noise(x0, randn(tuple(x0.shape), generator, x0.device), alpha, sigma)
        with torch.no_grad():
            real = ddim_path(self.teacher_model(text, scale), x_t, times, schedule, self.diffusion.prediction)
        return Rollout(x_t, times[0], times[-1], real, text, scale, valid_weight(batch, x0), n)

    def disc_inputs(self, r: Rollout, copies: int) -> dict[str, Any]:
        """D's conditioning for `copies` stacked batches: time t', text, the guidance scale (where
        the teacher or the student takes one), and the pair's x_t in the conditional phase."""
        tile = lambda v: torch.cat([v] * copies)  # noqa: E731
        inputs: dict[str, Any] = {"t_next": tile(r.t_next), "text": repeat_text(r.text, copies)}
        if self.conditional:
            inputs.update(x_t=tile(r.x_t), t=tile(r.t))
        if self.teacher.takes_guidance or self.model_cfg.guidance_embed:
            inputs["guidance"] = tile(r.scale)
        return inputs

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        r = self.rollout(batch, generator)
        prediction, kind = self.diffusion.prediction, self.stage_cfg.adv_loss
        schedule = self.schedule_for(r.x_t.shape[1:])  # the SNR shift of this batch's bucket

        # Student (generator) step: fool D, plus the x0 regression to the teacher's landing point.
        pred = self.run("student", r.x_t, r.t, r.text, **self.student_extras(r.scale))
        fake = ddim_from_prediction(pred, r.x_t, r.t, r.t_next, schedule, prediction)  # (B, ...)
        with no_param_grads(self.players["disc"]):
            logits_fake = self.players["disc"](fake, **self.disc_inputs(r, 1))  # (B, heads)
        adv = masked_mean(generator_loss(logits_fake, kind), r.weight)
        target = ddim_x0_target(r.x_t, r.real, r.t, r.t_next, schedule)
        mse = masked_mean(distill_loss(pred, target, r.x_t, r.t, schedule, prediction,
                                       self.diffusion.loss_weighting, self.diffusion.min_snr_gamma), r.weight)
        loss = adv + self.stage_cfg.adv_mse_weight * mse
        yield "student", loss, {"loss": valid_mean(loss, r.weight), "loss_adv": valid_mean(adv, r.weight),
                                "loss_mse": valid_mean(mse, r.weight), "student_steps": float(r.steps)}

        # Discriminator step on the same batch: teacher = real, student (before its update) = fake.
        logits = self.run("disc", torch.cat([r.real, fake.detach()]), **self.disc_inputs(r, 2))  # (2B, heads)
        logits_real, logits_fake = logits.detach().chunk(2)
        loss_d = masked_mean(discriminator_loss(*logits.chunk(2), kind), r.weight)
        yield "disc", loss_d, {"loss_disc": valid_mean(loss_d, r.weight),
                               "disc_acc": valid_mean(discriminator_accuracy(logits_real, logits_fake, r.weight),
                                                      r.weight),
                               "logit_real": valid_mean(masked_mean(logits_real.mean(1), r.weight), r.weight),
                               "logit_fake": valid_mean(masked_mean(logits_fake.mean(1), r.weight), r.weight),
                               "conditional": float(self.conditional)}
