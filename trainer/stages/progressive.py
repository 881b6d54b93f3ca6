"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models") of a trained DiT into a few-step sampler, with guidance-aware students
(Meng et al. 2023, "On Distillation of Guided Diffusion Models").

One round: the student starts from the teacher and learns to do in ONE deterministic DDIM step
what the teacher does in TWO. With z_t the noisy input at student time t, t' the teacher's
intermediate time and t'' the student's next time (all on trailing grids of the teacher's
zero-terminal-SNR schedule: the 2N-step grid holds the N-step grid at its even points), the
student's x0 target is the x0 for which one DDIM step t -> t'' lands on the teacher's z_t''
(Alg. 2; `teacher_x0_target`):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR max(SNR, 1) in x0 space (their sec. 4; `diffusion.loss_weighting:
trunc_snr`). `stage.rounds` lists the student step counts, each half the one before (e.g. 16, 8,
4, 2); `stage.steps` is split evenly across them and at each boundary the student becomes the
next round's teacher (kept in the checkpoint's stage.safetensors, so resume is exact). The split
is made when the run starts and kept there too: a resume with a larger `stage.steps` trains the
last round longer, and one that would cut a round short is refused (`keep_round_length`). Rank 0
exports each finished round to `<checkpoint.dir>/rounds/round_<r>_<N>steps/`: config.yaml (the
run's model, diffusion and data, stage.rounds cut at that round, the deepspeed.precision it
trained in), ema.safetensors (the weights to sample: the student that became the next teacher,
i.e. raw weights; for the last round the EMA, or the raw weights where ema.enabled=false),
round.json (its "weights" says which: ema or raw), COMPLETE.json; it loads with
`load_for_inference` and serves as `stage.teacher` of a later distillation.

The maths (student times, teacher paths, targets, loss) is in `trainer.diffusion.distill`; the
teacher, its checks and the guidance-aware student (Meng et al. 2023; without
`model.guidance_embed` it bakes in one guidance scale) in `trainer.stages.distillation`.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from trainer.bundle import frozen, place
from trainer.checkpoint_format import ENCODERS_FILE, ROUND_FILE, ROUNDS_DIR, write_inference_dir
from trainer.config import DataConfig, DeepSpeedConfig, DiffusionConfig, LogConfig, ModelConfig, RunConfig, to_yaml
from trainer.diffusion import add_noise, randn
from trainer.diffusion.distill import (
    distill_loss,
    draw_guidance,
    draw_student_steps,
    masked_mean,
    student_step_times,
    teacher_x0_target,
    valid_weight,
)
from trainer.encoder_record import encoders_record
from trainer.stage_config import ProgressiveSettings, as_section
from trainer.stages.base import PlayerLoss
from trainer.stages.checks import check_round_length, check_rounds
from trainer.stages.distillation import DistillationStage, Teacher


class ProgressiveStage(DistillationStage):
    """Rounds of progressive distillation, each N -> N / 2 steps, run by one command; finished
    rounds are exported under `export_dir` (`<checkpoint.dir>/rounds`, rank 0)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, settings: ProgressiveSettings) -> "ProgressiveStage":
        return cls(cfg.model, cfg.diffusion, settings, cfg.data, Path(cfg.checkpoint.dir) / ROUNDS_DIR,
                   ema=cfg.ema.enabled, precision=cfg.deepspeed.precision)

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: ProgressiveSettings, data: DataConfig,
                 export_dir: Optional[Path] = None, ema: bool = True, precision: str = "fp32"):
        super().__init__(model, diffusion, stage, data)
        self.export_dir = export_dir
        self.precision = precision  # recorded in the exports: `dit sample --precision auto` samples in it
        # What the engine hands `write_samples`: the EMA, or the raw weights where none is kept.
        self.sampled_weights = "ema" if ema else "raw"
        self.rounds = list(stage.rounds)
        check_rounds(self.rounds, stage.steps, self.teacher.steps, diffusion.num_timesteps)
        self.round_length = stage.steps // len(self.rounds)
        self.round = 0  # index of the round whose teacher `self.teacher` is

    def round_of(self, step: int) -> int:
        """Round index of 0-based step `step`: even split, the remainder joins the last round."""
        return min(step // self.round_length, len(self.rounds) - 1)

    @property
    def student_steps(self) -> int:
        return self.rounds[self.round]

    # ---- rounds -------------------------------------------------------------------------------
    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, Tensor]]) -> bool:
        """At a round boundary (the same step on every rank) the student becomes the teacher,
        and the next round's student, starting from the same weights, is a new training: its
        EMA starts again there (an EMA of decay d kept d^N of the previous round's student, a
        sampler of twice the steps, after a round of N steps: 1.8% at 0.999 over 4,000)."""
        super().start_of_step(step, student_weights)
        if self.round_of(step) == self.round:
            return False
        weights = student_weights()  # collective
        self.export_round(weights, "raw", step)
        self.become_teacher(weights, self.round + 1)
        return True

    def become_teacher(self, weights: dict[str, Tensor], round_index: int) -> None:
        """Round `round_index`'s teacher: the previous student, a (2 * its steps)-step sampler. A
        fresh network (the player may hold ZeRO-3 partitions), built without touching the global
        RNG, which the checkpoint restores before this runs on resume."""
        with torch.random.fork_rng(devices=[]):
            net = frozen(self.bundle.network(None))
        net.load_state_dict(weights)
        place(net, self.device, self.helper_dtype)
        self.teacher = Teacher(net, uses_cfg=False, steps=2 * self.rounds[round_index])
        self.round = round_index

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "round_length": torch.tensor(self.round_length)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "round_length" in tensors:
            self.keep_round_length(int(tensors["round_length"]))
        super().load_state_tensors(tensors)

    def keep_round_length(self, saved: int) -> None:
        """Rounds keep the length the run started with: the rounds before the resume had it, and
        a new split would move boundaries already passed. A changed `stage.steps` moves the end
        of the last round only, and may not cut it (or a round before it) short."""
        check_round_length(saved, len(self.rounds), self.stage_cfg.steps)
        if saved != self.round_length:
            self.note(f"rounds keep the {saved} steps this run started with; the last round runs to step "
                      f"{self.stage_cfg.steps}")
        self.round_length = saved

    def teacher_state(self) -> dict[str, Tensor]:
        """The teacher the run started with (round 0), else the current one, a former student,
        whole (exact resume)."""
        if self.round == 0:
            return super().teacher_state()
        state = {f"teacher.{k}": v for k, v in self.teacher.net.state_dict().items()}
        return {**state, "round": torch.tensor(self.round)}

    def load_teacher_state(self, tensors: dict[str, Tensor]) -> None:
        if "round" not in tensors:
            super().load_teacher_state(tensors)
            return
        weights = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
        self.become_teacher(weights, int(tensors["round"]))

    def export_round(self, weights: dict[str, Tensor], kind: str, step: int) -> Optional[Path]:
        """Rank 0 writes `<checkpoint.dir>/rounds/round_<r>_<N>steps/` for the round in progress."""
        if self.export_dir is None or not self.writes_files:
            return None
        number, steps = self.round + 1, self.student_steps
        cfg = RunConfig(model=self.model_cfg, diffusion=self.diffusion, data=self.data,
                        stage=as_section(replace(self.stage_cfg, rounds=self.rounds[: self.round + 1])),
                        log=replace(LogConfig(), sample_steps=steps),
                        deepspeed=DeepSpeedConfig(precision=self.precision))
        meta = {"round": number, "steps": steps, "weights": kind, "step": step,
                "guidance_embed": self.model_cfg.guidance_embed,
                "guidance_range": [self.stage_cfg.guidance_min, self.stage_cfg.guidance_max]}
        meta_json = json.dumps(meta, indent=1, sort_keys=True) + "\n"
        return write_inference_dir(self.export_dir / f"round_{number}_{steps}steps", weights, to_yaml(cfg),
                                   {ROUND_FILE: meta_json, ENCODERS_FILE: encoders_record(self.model_cfg)}, step)

    # ---- the loss -----------------------------------------------------------------------------
    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """Student inputs (x_t, t, text, guidance) and targets (x~, x_t, t, weight) of one batch."""
        x0 = self.clean_input(batch)  # (B, C, h, w) or (B, C, F, h, w)
        text = self.condition(batch, generator)
        B = x0.shape[0]
        scale = draw_guidance(self.stage_cfg.guidance_min, self.stage_cfg.guidance_max, B, generator, x0.device)  # (B,)
        k = draw_student_steps(self.student_steps, B, generator, x0.device)  # (B,)
        schedule = self.schedule_for(x0.shape[1:])  # the SNR shift of this batch's bucket
        times = student_step_times(schedule, self.student_steps, 2, k)  # t, t', t'' each (B,)
        alpha, sigma = schedule.alpha_sigma(times[0])  # (B,), (B,)
        x_t = add_noise(x0, randn(tuple(x0.shape), generator, x0.device), alpha, sigma)
        with torch.no_grad():
            target = teacher_x0_target(self.teacher_model(text, scale), x_t, times, schedule,
                                       self.diffusion.prediction)  # (B, ...)
        inputs = {"x": x_t, "t": times[0], "text": text, **self.student_extras(scale)}
        return inputs, (target, x_t, times[0], valid_weight(batch, x0))

    def weighted_loss(self, pred: Tensor, targets: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(loss over the valid samples, per-sample loss (B,))."""
        target, x_t, t, weight = targets
        per_sample = distill_loss(pred, target, x_t, t, self.schedule_for(x_t.shape[1:]), self.diffusion.prediction,
                                  self.diffusion.loss_weighting, self.diffusion.min_snr_gamma)  # (B,)
        return masked_mean(per_sample, weight), per_sample

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        for player, loss, info in super().losses(batch, generator):
            yield player, loss, {**info, "round": float(self.round + 1), "student_steps": float(self.student_steps)}

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """The grid; after the last step also the last round's export (of the EMA weights, the
        raw ones where ema.enabled=false), on a resume at the last step too (`step` comes back
        with the stage state)."""
        if weights is not None and self.step + 1 >= self.stage_cfg.steps:
            self.export_round(weights, self.sampled_weights, self.stage_cfg.steps)
        return super().write_samples(weights, log, path)
