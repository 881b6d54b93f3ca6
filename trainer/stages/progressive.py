"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models") of a trained DiT into a few-step sampler, with guidance-aware students
(Meng et al. 2023, "On Distillation of Guided Diffusion Models").

One round: the student starts from the teacher and learns to do in ONE deterministic DDIM step
what the teacher does in TWO. With z_t the noisy input at student time t, t' the teacher's
intermediate time and t'' the student's next time (all on trailing grids of the teacher's
zero-terminal-SNR schedule: the 2N-step grid holds the N-step grid at its even points), the
student's x0 target is the x0 for which one DDIM step t -> t'' lands on the teacher's z_t''
(Alg. 2; `ddim_x0_target`):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR max(SNR, 1) in x0 space (their sec. 4; `diffusion.loss_weighting:
trunc_snr`). `stage.rounds` lists the student step counts, each half the one before (e.g. 16, 8,
4, 2); `stage.steps` is split evenly across them and at each boundary the student becomes the
next round's teacher (kept in the checkpoint's stage.safetensors, so resume is exact). Rank 0
exports each finished round to `<checkpoint.dir>/rounds/round_<r>_<N>steps/`: config.yaml (the
run's, stage.rounds cut at that round), ema.safetensors (the student that became the next
teacher, i.e. raw weights; for the last round the EMA), round.json, COMPLETE.json; it loads
with `load_for_inference` and serves as `stage.teacher` of a later distillation.

Guidance: the original teacher is sampled with classifier-free guidance at a scale w drawn per
sample from [stage.guidance_min, stage.guidance_max]; with `model.guidance_embed` the student
is conditioned on w (embedded like t, its last layer zero-initialized so that the student starts
as the teacher), so the distilled sampler needs one forward per step instead of two. Without it
the student learns the average over the range (set min = max for a fixed scale).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from trainer.checkpoint import COMPLETE, EMA_FILE, LATEST, load_for_inference
from trainer.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    StageConfig,
    load_config,
    to_dict,
    to_yaml,
)
from trainer.diffusion import (
    NoiseSchedule,
    add_noise,
    append_dims,
    apply_guidance,
    ddim_step,
    ddim_x0_target,
    diffusion_loss,
    rand,
    randint,
    randn,
    sampling_timesteps,
    to_eps,
    to_x0,
)
from trainer.media import save_grid
from trainer.models.dit import DiT, TextEmbedding, build_dit
from trainer.sampling import SamplerSettings, conditioned, generate
from trainer.stages.base import PlayerLoss, frozen, place
from trainer.stages.pretrain import PretrainStage

Model = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> prediction, as the samplers take it
CondModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]

# CFG on the teacher uses the rescale its sampler uses (Lin et al. 2023 recommend 0.7 with zero
# terminal SNR), so that the student reproduces what `dit sample` draws from the teacher.
TEACHER_RESCALE = SamplerSettings.guidance_rescale
SAMPLE_STEPS = (1, 2, 4)  # rows of the sample grid and of the adherence evaluation
ROUNDS_DIR = "rounds"
ROUND_FILE = "round.json"
# Keys that must agree with the teacher's run config: the student is the teacher's network on
# the teacher's data, schedule and text encoder.
TEACHER_KEYS = {
    "model": None,  # all of it except the keys below
    "diffusion": ("schedule", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction",
                  "shift_base_resolution", "shift_base_frames"),
    "data": ("kind", "resolution", "num_frames"),
}
# Free to differ: the student's own options, and where weights live (copies may move).
FREE_MODEL_KEYS = ("guidance_embed", "activation_checkpointing", "checkpoint_policy", "text.path", "autoencoder.path")


# ------------------------------------------------------------------------------- pure maths


def draw_student_steps(num_steps: int, batch: int, generator: torch.Generator,
                       device: Optional[torch.device] = None) -> Tensor:
    """Which step k ~ U{0, ..., N-1} of the N-step student sampler each sample trains. (B,) int64"""
    return randint(num_steps, (batch,), generator, device or generator.device)


def student_step_times(schedule: NoiseSchedule, num_steps: int, substeps: int, k: Tensor) -> list[Tensor]:
    """Times of step k (B,) of an N-step trailing sampler, split into the `substeps` steps the
    teacher's N * substeps-step trailing sampler takes over the same interval.

    Trailing grids nest (Lin et al. 2023, Table 2): j = round(T - i T / (N s)) at i = k s is
    j = round(T - k T / N), so the first time is the student's t and the last its next time.
    Returns substeps + 1 tensors (B,), decreasing; progressive distillation uses substeps = 2.
    """
    grid = sampling_timesteps(schedule, num_steps * substeps, "trailing").to(k.device)  # (N s + 1,)
    return [grid[k * substeps + j] for j in range(substeps + 1)]


def ddim_from_prediction(pred: Tensor, x_t: Tensor, t: Tensor, t_next: Tensor, schedule: NoiseSchedule,
                         prediction: str) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12) t -> t_next from a raw prediction at
    (x_t, t), with the eps it implies (finite at alpha = 0 for v-prediction). (B, ...)"""
    alpha, sigma = schedule.alpha_sigma(t)  # (B,), (B,)
    x0, eps = to_x0(pred, x_t, alpha, sigma, prediction), to_eps(pred, x_t, alpha, sigma, prediction)
    return ddim_step(x_t, x0, t, t_next, schedule, eps=eps)


def ddim_path(model: Model, x_t: Tensor, times: Sequence[Tensor], schedule: NoiseSchedule, prediction: str) -> Tensor:
    """Deterministic DDIM through per-sample `times` (each (B,)): x at times[-1]. (B, ...)"""
    x = x_t
    for t, t_next in zip(times[:-1], times[1:]):
        x = ddim_from_prediction(model(x, t), x, t, t_next, schedule, prediction)
    return x


def teacher_x0_target(teacher: Model, x_t: Tensor, times: Sequence[Tensor], schedule: NoiseSchedule,
                      prediction: str) -> Tensor:
    """The student's x0 target (Salimans & Ho 2022, Alg. 2): the x0 whose single DDIM step
    times[0] -> times[-1] lands where the teacher's DDIM steps through `times` land. (B, ...)"""
    x_next = ddim_path(teacher, x_t, times, schedule, prediction)  # (B, ...)
    return ddim_x0_target(x_t, x_next, times[0], times[-1], schedule)


def distill_loss(pred: Tensor, x0_target: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule,
                 prediction: str, weighting: str = "trunc_snr") -> Tensor:
    """Weighted MSE of the student's raw prediction against the x0 target, carried into the
    prediction's own space (`diffusion_loss`): trunc_snr is max(SNR, 1) ||x0_hat - x~||^2
    (Salimans & Ho 2022, sec. 4). Needs t > 0 (the target's eps divides by sigma). (B,)"""
    alpha, sigma = schedule.alpha_sigma(t)  # (B,), (B,)
    eps_target = to_eps(x0_target, x_t, alpha, sigma, "x0")  # (B, ...)
    return diffusion_loss(pred, x0_target, eps_target, x_t, alpha, sigma, prediction, weighting)


def guided_model(model: CondModel, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: Tensor,
                 rescale: float = 0.0) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022) at a per-sample scale w (B,), the teacher
    of guided distillation (Meng et al. 2023): one batched forward over [cond; uncond], then
    u + w (c - u) with guidance rescale (a teacher at w = 1 is called without it: `Teacher`)."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...)
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # (B, ...) each
        return apply_guidance(c, u, append_dims(scale, c.ndim).to(c.dtype), rescale)  # type: ignore[arg-type]

    return guided


def valid_weight(batch: dict[str, Any], x0: Tensor) -> Tensor:
    """1 for real samples, 0 for the loader's padding repeats (`batch["valid"]`). (B,)"""
    return batch["valid"].to(x0.dtype) if "valid" in batch else x0.new_ones(x0.shape[0])


def masked_mean(per_sample: Tensor, weight: Tensor) -> Tensor:
    """Mean of a per-sample value (B,) over the samples of weight 1; scalar."""
    return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)


def draw_guidance(stage: StageConfig, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """w ~ U[guidance_min, guidance_max] per sample (Meng et al. 2023, sec. 4). (B,)"""
    return stage.guidance_min + (stage.guidance_max - stage.guidance_min) * rand((batch,), generator, device)


# ------------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
    """A frozen network and how to call it: with CFG (a diffusion model), or conditioned on the
    guidance scale / with guidance baked in (a distilled student) at its own step count."""

    net: DiT
    uses_cfg: bool  # False for distilled teachers: one forward per step
    steps: Optional[int]  # the sampler it was distilled into; None: a full diffusion model

    @property
    def takes_guidance(self) -> bool:
        return self.net.spec.guidance

    def model(self, text: TextEmbedding, null: TextEmbedding, scale: Tensor, guided: bool = True) -> Model:
        """The teacher as `(x_t, t) -> prediction` for this batch's text and guidance scales (B,);
        `guided=False` (every scale is 1) runs a CFG teacher's conditional half alone."""
        cond: dict[str, Tensor] = dict(text._asdict())
        if self.takes_guidance:
            cond["guidance"] = scale
        net = conditioned(self.net)
        if not self.uses_cfg or not guided:
            return lambda x, t: net(x, t, cond)
        return guided_model(net, cond, dict(null._asdict()), scale, TEACHER_RESCALE)


def read_run_config(yaml_text: str) -> RunConfig:
    """A resolved config.yaml (a checkpoint's) as a validated RunConfig."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(yaml_text)
        f.flush()
        return load_config(f.name)


def distilled_steps(cfg: RunConfig) -> Optional[int]:
    """The step count a distillation checkpoint's student samples with; None for other stages."""
    if cfg.stage.kind == "progressive":
        return cfg.stage.rounds[-1]
    if cfg.stage.kind == "adversarial":
        return max(cfg.stage.rounds)
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b": value}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_as_teacher(run: dict[str, Any], teacher: dict[str, Any], where: str) -> None:
    """The student's model (except FREE_MODEL_KEYS), schedule and data shapes must be the
    teacher's; the error names the key and the teacher's value."""
    for section, keys in TEACHER_KEYS.items():
        ours, theirs = flatten(run[section]), flatten(teacher[section])
        names = keys or [k for k in theirs if k not in FREE_MODEL_KEYS]
        for key in names:
            if ours.get(key) != theirs[key]:
                raise ConfigError(f"{section}.{key}", f"the teacher ({where}) was trained with "
                                  f"{section}.{key}={theirs[key]!r}, this run has {ours.get(key)!r}; set it to "
                                  f"the teacher's value")


def check_teacher_exists(directory: str) -> None:
    if not directory:
        raise ConfigError("stage.teacher", "distillation needs the teacher's checkpoint directory")
    if not Path(directory).exists():
        raise ConfigError("stage.teacher", f"{directory} does not exist; point it at a checkpoint directory")


def check_teacher(directory: str, model: ModelConfig, diffusion: DiffusionConfig, data: DataConfig,
                  config_yaml: Optional[str] = None) -> RunConfig:
    """The teacher's run config, after checking that `stage.teacher` names one whose network,
    schedule and data this run shares (reads only its config.yaml unless given)."""
    check_teacher_exists(directory)
    if config_yaml is None:
        root = Path(directory)
        step = root / (root / LATEST).read_text().strip() if (root / LATEST).is_file() else root
        if not (step / "config.yaml").is_file():
            raise ConfigError("stage.teacher", f"{directory} holds no checkpoint (no config.yaml); point it at a "
                                               f"checkpoint root, a step directory or a round export")
        config_yaml = (step / "config.yaml").read_text()
    cfg = read_run_config(config_yaml)
    ours = {"model": to_dict(model), "diffusion": to_dict(diffusion), "data": to_dict(data)}
    check_same_as_teacher(ours, {"model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion),
                                 "data": to_dict(cfg.data)}, directory)
    return cfg


def check_weighting(diffusion: DiffusionConfig) -> None:
    if diffusion.zero_terminal_snr and diffusion.loss_weighting == "min_snr":
        raise ConfigError("diffusion.loss_weighting", "min_snr weighs t = 1 (SNR 0) by 0, the step every distilled "
                                                      "sampler starts with; use trunc_snr (Salimans & Ho 2022)")


def check_distillation(cfg: RunConfig) -> None:
    """What a progressive or adversarial run needs, checked from configs alone (no network is
    built): `dit train` and `dit launch` run it before any process starts."""
    check_weighting(cfg.diffusion)
    teacher = check_teacher(cfg.stage.teacher, cfg.model, cfg.diffusion, cfg.data)
    if cfg.stage.kind == "progressive":
        check_rounds(cfg.stage.rounds, cfg.stage.steps, distilled_steps(teacher))
    else:
        from trainer.stages.adversarial import check_adversarial

        check_adversarial(cfg.stage, distilled_steps(teacher), cfg.log.sample_steps)


def load_teacher(directory: str, model: ModelConfig, diffusion: DiffusionConfig, data: DataConfig,
                 text_dim: int, pooled_dim: int) -> tuple[Teacher, dict[str, Tensor]]:
    """The frozen teacher of `stage.teacher` (a checkpoint root with `latest`, a step directory or
    a round export) built from its own config and EMA weights, and those weights."""
    check_teacher_exists(directory)
    config_yaml, weights = load_for_inference(directory)
    cfg = check_teacher(directory, model, diffusion, data, config_yaml)
    net = frozen(build_dit(cfg.model, text_dim, pooled_dim))
    net.load_state_dict(weights)
    steps = distilled_steps(cfg)
    return Teacher(net, uses_cfg=steps is None, steps=steps), weights


@torch.no_grad()
def init_student_from(student: DiT, weights: dict[str, Tensor]) -> None:
    """Copy the teacher into the student. A guidance embedder the teacher lacks is new: its last
    layer is zeroed so that it adds nothing and the student starts equal to the teacher."""
    if student.embed.guidance_embedder is None and any(k.startswith("embed.guidance_embedder.") for k in weights):
        raise ConfigError("model.guidance_embed", "the teacher is guidance-conditioned (a distilled student); "
                                                  "set model.guidance_embed=true")
    missing, unexpected = student.load_state_dict(weights, strict=False)
    new = {k for k in missing if not k.startswith("embed.guidance_embedder.")}
    if new or unexpected:
        raise ValueError(f"the teacher's weights do not fit the student: missing {sorted(new)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    if missing and student.embed.guidance_embedder is not None:
        last = student.embed.guidance_embedder.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)


# ------------------------------------------------------------------------------- exports


def export_student(directory: Path, weights: dict[str, Tensor], config_yaml: str, meta: dict[str, Any]) -> Path:
    """A loadable inference directory: config.yaml, ema.safetensors (the weights to sample),
    round.json, and COMPLETE.json with their sha256 (what `load_for_inference` checks); written
    to a temporary name and renamed, replacing an earlier export of the same round."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / EMA_FILE))
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / ROUND_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
    (tmp / COMPLETE).write_text(json.dumps({"step": meta.get("step", 0), "world_size": 1, "files": files}, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


# ------------------------------------------------------------------------------- stages


class DistillationStage(PretrainStage):
    """What the progressive and adversarial stages share: the frozen teacher, the student
    initialised from it, per-sample guidance scales, and few-step samples and evaluation (the
    student samples without CFG, with guidance = log.sample_cfg when guidance-conditioned)."""

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: StageConfig, data: DataConfig):
        check_weighting(diffusion)
        super().__init__(model, diffusion, stage, data)
        self.teacher, weights = load_teacher(stage.teacher, model, diffusion, data, self.text.dim, self.text.pooled_dim)
        init_student_from(self.players["student"], weights)
        self.step = 0  # set by start_of_step on every rank

    def helpers(self) -> list[nn.Module]:
        return [*super().helpers(), self.teacher.net]

    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, Tensor]]) -> None:
        self.step = step

    # ---- conditioning -----------------------------------------------------------------------
    def student_extras(self, scale: Tensor) -> dict[str, Tensor]:
        return {"guidance": scale} if self.model_cfg.guidance_embed else {}

    def teacher_model(self, text: TextEmbedding, scale: Tensor) -> Model:
        guided = not self.stage_cfg.guidance_min == self.stage_cfg.guidance_max == 1
        return self.teacher.model(text, self.text.null_embedding(scale.shape[0]), scale, guided)

    # ---- samples and evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def teacher_pixels(self, prompts: Sequence[str], log: LogConfig, generator: torch.Generator) -> Tensor:
        """The current teacher as users sample it: CFG at log.sample_steps, or its own steps."""
        if self.teacher.uses_cfg:
            settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
            x0 = generate(self.teacher.net, self.text, self.schedule, self.diffusion.prediction, prompts,
                          self.sample_shape(), settings, generator)
            return self.decode(x0).clamp(-1, 1)
        return distilled_pixels(self, self.teacher.net, prompts, self.teacher.steps or 1, log.sample_cfg, generator)

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """Rows: the current teacher, then the student at 1, 2 and 4 steps (fixed seed)."""
        net = self.sampling_net(weights)
        prompts = list(log.prompts)
        rows = [self.teacher_pixels(prompts, log, torch.Generator().manual_seed(0))]
        sampler = f"{log.sample_steps} steps, CFG" if self.teacher.uses_cfg else f"{self.teacher.steps} steps"
        labels = [f"teacher ({sampler}): {p}" for p in prompts]
        for steps in SAMPLE_STEPS:
            rows.append(distilled_pixels(self, net, prompts, steps, log.sample_cfg, torch.Generator().manual_seed(0)))
            labels += [f"{steps} step{'s' if steps > 1 else ''}: {p}" for p in prompts]
        return save_grid(torch.cat(rows), labels, path, cols=len(prompts))

    def eval_metrics(self, weights: Optional[dict[str, Tensor]], log: LogConfig) -> dict[str, float]:
        """The shapes judge (trainer.judge) on log.prompts at 1, 2 and 4 student steps:
        `eval/adherence/<n>step/<attribute>`. For the engine's log.eval_every hook."""
        from trainer.judge import judge

        net = self.sampling_net(weights)
        metrics: dict[str, float] = {}
        for steps in SAMPLE_STEPS:
            pixels = distilled_pixels(self, net, log.prompts, steps, log.sample_cfg, torch.Generator().manual_seed(0))
            metrics.update(judge(pixels, log.prompts).as_metrics(f"eval/adherence/{steps}step"))
        return metrics


@torch.no_grad()
def distilled_pixels(stage: PretrainStage, net: nn.Module, prompts: Sequence[str], steps: int, scale: float,
                     generator: torch.Generator, extras: Optional[dict[str, Tensor]] = None,
                     shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """Sample a distilled student (one forward per step, guidance scale as an input when the
    network takes one) with any stage's schedule, text encoder and autoencoder; pixels in [-1, 1].
    `extras`: further conditioning (a super-resolution student's low-resolution input); `shape`:
    the DiT input shape (C, [F,] h, w) (default: the stage's square), sampled with its shift."""
    device = next(net.parameters()).device
    extras = dict(extras or {})
    if net.spec.guidance:
        extras["guidance"] = torch.full((len(prompts),), float(scale), device=device)
    settings = SamplerSettings(steps=steps, cfg_scale=1.0)
    shape = shape or stage.sample_shape()
    x0 = generate(net, stage.text, stage.schedule_for(shape), stage.diffusion.prediction, prompts, shape,
                  settings, generator, extras)
    return stage.decode(x0).clamp(-1, 1)


def check_rounds(rounds: Sequence[int], total_steps: int, teacher_steps: Optional[int]) -> None:
    """Each round halves the step count of the one before; a distilled teacher is the round -1."""
    if not rounds or any(n < 1 for n in rounds):
        raise ConfigError("stage.rounds", f"{list(rounds)}: list the student step counts, e.g. [16, 8, 4, 2]")
    for before, after in zip(rounds, rounds[1:]):
        if before != 2 * after:
            raise ConfigError("stage.rounds", f"{list(rounds)}: each round halves the previous one's steps "
                                              f"(the teacher takes two steps per student step)")
    if teacher_steps is not None and teacher_steps != 2 * rounds[0]:
        raise ConfigError("stage.rounds", f"the teacher is a {teacher_steps}-step distilled sampler, so the "
                                          f"first round's student has {teacher_steps // 2} steps, not {rounds[0]}")
    if total_steps < len(rounds):
        raise ConfigError("stage.steps", f"{total_steps} steps cannot be split across {len(rounds)} rounds")


class ProgressiveStage(DistillationStage):
    """Rounds of progressive distillation, each N -> N / 2 steps, run by one command; finished
    rounds are exported under `export_dir` (`<checkpoint.dir>/rounds`, rank 0)."""

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: StageConfig, data: DataConfig,
                 export_dir: Optional[Path] = None):
        super().__init__(model, diffusion, stage, data)
        self.export_dir = export_dir
        self.rounds = list(stage.rounds)
        check_rounds(self.rounds, stage.steps, self.teacher.steps)
        self.round_length = stage.steps // len(self.rounds)
        self.round = 0  # index of the round whose teacher `self.teacher` is

    def round_of(self, step: int) -> int:
        """Round index of 0-based step `step`: even split, the remainder joins the last round."""
        return min(step // self.round_length, len(self.rounds) - 1)

    @property
    def student_steps(self) -> int:
        return self.rounds[self.round]

    # ---- rounds -------------------------------------------------------------------------------
    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, Tensor]]) -> None:
        """At a round boundary (the same step on every rank) the student becomes the teacher."""
        super().start_of_step(step, student_weights)
        if self.round_of(step) == self.round:
            return
        weights = student_weights()  # collective
        self.export_round(weights, "raw", step)
        self.become_teacher(weights, self.round + 1)

    def become_teacher(self, weights: dict[str, Tensor], round_index: int) -> None:
        """Round `round_index`'s teacher: the previous student, a (2 * its steps)-step sampler. A
        fresh network (the player may hold ZeRO-3 partitions), built without touching the global
        RNG, which the checkpoint restores before this runs on resume."""
        with torch.random.fork_rng(devices=[]):
            net = frozen(build_dit(self.model_cfg, self.text.dim, self.text.pooled_dim))
        net.load_state_dict(weights)
        place(net, self.device, self.helper_dtype)
        self.teacher = Teacher(net, uses_cfg=False, steps=2 * self.rounds[round_index])
        self.round = round_index

    def state_tensors(self) -> dict[str, Tensor]:
        """The current teacher once it is a former student (round > 0), for exact resume."""
        if self.round == 0:
            return {}
        state = {f"teacher.{k}": v for k, v in self.teacher.net.state_dict().items()}
        return {**state, "round": torch.tensor(self.round)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "round" in tensors:
            weights = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
            self.become_teacher(weights, int(tensors["round"]))

    def export_round(self, weights: dict[str, Tensor], kind: str, step: int) -> Optional[Path]:
        """Rank 0 writes `<checkpoint.dir>/rounds/round_<r>_<N>steps/` for the round in progress."""
        if self.export_dir is None or not self.writes_files:
            return None
        number, steps = self.round + 1, self.student_steps
        cfg = RunConfig(model=self.model_cfg, diffusion=self.diffusion, data=self.data,
                        stage=replace(self.stage_cfg, rounds=self.rounds[: self.round + 1]),
                        log=replace(LogConfig(), sample_steps=steps))
        meta = {"round": number, "steps": steps, "weights": kind, "step": step,
                "guidance_embed": self.model_cfg.guidance_embed,
                "guidance_range": [self.stage_cfg.guidance_min, self.stage_cfg.guidance_max]}
        return export_student(self.export_dir / f"round_{number}_{steps}steps", weights, to_yaml(cfg), meta)

    # ---- the loss -----------------------------------------------------------------------------
    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """Student inputs (x_t, t, text, guidance) and targets (x~, x_t, t, weight) of one batch."""
        x0 = self.clean_input(batch)  # (B, C, h, w) or (B, C, F, h, w)
        text = self.condition(batch, generator)
        B = x0.shape[0]
        scale = draw_guidance(self.stage_cfg, B, generator, x0.device)  # (B,)
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
                                  self.diffusion.loss_weighting)  # (B,)
        return masked_mean(per_sample, weight), per_sample

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        for player, loss, info in super().losses(batch, generator):
            yield player, loss, {**info, "round": float(self.round + 1), "student_steps": float(self.student_steps)}

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """The grid; after the last step also the last round's export (of the EMA weights)."""
        if weights is not None and self.step + 1 >= self.stage_cfg.steps:
            self.export_round(weights, "ema", self.stage_cfg.steps)
        return super().write_samples(weights, log, path)


def rounds_exports(checkpoint_dir: str | Path) -> dict[int, Path]:
    """Step count -> export directory of a progressive run's finished rounds."""
    out = {}
    for directory in sorted(Path(checkpoint_dir, ROUNDS_DIR).glob("round_*steps")):
        if (directory / COMPLETE).is_file():
            out[json.loads((directory / ROUND_FILE).read_text())["steps"]] = directory
    return out
