"""What the progressive and adversarial distillation stages share: the frozen teacher (a
trained diffusion model sampled with classifier-free guidance, or a distilled student at its own
step count), the student initialised from it, and few-step samples and evaluation of the
student. The checks that the teacher fits this run live in `trainer.stages.checks`.

Guidance (Meng et al. 2023, "On Distillation of Guided Diffusion Models"): the original teacher
is sampled with classifier-free guidance at a scale w drawn per sample from
[stage.guidance_min, stage.guidance_max]; with `model.guidance_embed` the student is conditioned
on w (embedded like t, its last layer zero-initialized so that the student starts as the
teacher), so the distilled sampler needs one forward per step instead of two. Without it the
student takes no w and bakes in the one stage.guidance_min = stage.guidance_max (1: an unguided
teacher); a range is refused (`stage_config.check_guidance_input`): the student would regress onto
targets at random w and learn their blend, a scale nobody chose that `dit sample --cfg` cannot
change.

Resume: `stage.teacher` names a checkpoint root whose `latest` may move on (its run trains on,
retention deletes old steps), so the stage state records the step directory it resolved to and
the sha256 of its weights; a resume distils exactly that teacher or refuses (`keep_teacher`).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from trainer.bundle import frozen, place
from trainer.checkpoint_format import EMA_FILE, CheckpointError, load_for_inference, resolve, verify
from trainer.config import ConfigError, DataConfig, DiffusionConfig, LogConfig, ModelConfig, check_weighting
from trainer.diffusion import SamplerSettings
from trainer.diffusion.distill import Model, guided_model
from trainer.media import save_grid
from trainer.models.dit import DiT, TextEmbedding, build_dit
from trainer.models.text import conditioned
from trainer.stage_config import ProgressiveSettings
from trainer.stages.checks import check_guidance_taught, check_teacher, check_teacher_exists, teacher_steps
from trainer.stages.pretrain import PretrainStage

# CFG on the teacher uses the rescale its sampler uses (Lin et al. 2023 recommend 0.7 with zero
# terminal SNR), so that the student reproduces what `dit sample` draws from the teacher.
TEACHER_RESCALE = SamplerSettings.guidance_rescale
SAMPLE_STEPS = (1, 2, 4)  # rows of the sample grid and of the adherence evaluation
TEACHER_RECORD = ("teacher_name", "teacher_dir", "teacher_sha256")  # stage.safetensors: `TeacherSource`


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


@dataclass(frozen=True)
class TeacherSource:
    """Which weights a run distils: `stage.teacher`, the step directory it resolved to and the
    sha256 that directory's COMPLETE.json records for the EMA weights."""

    name: str
    directory: str
    sha256: str

    def tensors(self) -> dict[str, Tensor]:
        """For stage.safetensors, which holds tensors only: the strings as UTF-8 bytes."""
        return {key: text_tensor(value) for key, value in zip(TEACHER_RECORD, astuple(self))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "TeacherSource":
        return cls(*(tensor_text(tensors[key]) for key in TEACHER_RECORD))


def text_tensor(text: str) -> Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def tensor_text(tensor: Tensor) -> str:
    return bytes(tensor.tolist()).decode()


def recorded_sha256(directory: str | Path) -> Optional[str]:
    """The sha256 of the EMA weights in a complete checkpoint's manifest; None where the
    directory is gone or incomplete (its file is checked against it when loaded)."""
    try:
        return verify(Path(directory), ())["files"][EMA_FILE]
    except (CheckpointError, KeyError):
        return None


def load_teacher(directory: str, model: ModelConfig, diffusion: DiffusionConfig, data: DataConfig,
                 text_dim: int, pooled_dim: int) -> tuple[Teacher, dict[str, Tensor], TeacherSource]:
    """The frozen teacher of `stage.teacher` (a checkpoint root with `latest`, a step directory or
    a round export) built from its own config and EMA weights, those weights, and the step
    directory they came from."""
    check_teacher_exists(directory)
    step = resolve(directory)
    config_yaml, weights = load_for_inference(step)
    cfg = check_teacher(directory, model, diffusion, data, config_yaml)
    net = frozen(build_dit(cfg.model, text_dim, pooled_dim))
    net.load_state_dict(weights)
    steps = teacher_steps(directory, cfg.stage)
    source = TeacherSource(directory, str(step), recorded_sha256(step) or "")
    return Teacher(net, uses_cfg=steps is None, steps=steps), weights, source


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


# ------------------------------------------------------------------------------- the stage


class DistillationStage(PretrainStage):
    """What the progressive and adversarial stages share: the frozen teacher, the student
    initialised from it, per-sample guidance scales, and few-step samples and evaluation (the
    student samples without CFG, with guidance = log.sample_cfg when guidance-conditioned)."""

    student_from_weights = True

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: ProgressiveSettings, data: DataConfig):
        check_weighting(diffusion)
        super().__init__(model, diffusion, stage, data)
        self.teacher, weights, self.teacher_source = load_teacher(stage.teacher, model, diffusion, data,
                                                                  self.text.dim, self.text.pooled_dim)
        check_guidance_taught(model.guidance_embed, self.teacher.steps, self.teacher.takes_guidance)
        init_student_from(self.players["student"], weights)
        self.step = 0  # set by start_of_step on every rank, and by a resume

    def helpers(self) -> list[nn.Module]:
        return [*super().helpers(), self.teacher.net]

    def start_of_step(self, step: int, student_weights: Callable[[], dict[str, Tensor]]) -> bool:
        self.step = step
        return False

    def note(self, message: str) -> None:
        """One line from the rank that writes the stage's files: what a resume kept."""
        if self.writes_files:
            print(f"dit train: {message}", flush=True)

    # ---- resume -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The step the stage last started (a resume at the run's last step starts none, and the
        end-of-run work reads it) and the teacher's record (`teacher_state`)."""
        return {"step": torch.tensor(self.step), **self.teacher_state()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "step" in tensors:
            self.step = int(tensors["step"])
        self.load_teacher_state(tensors)

    def teacher_state(self) -> dict[str, Tensor]:
        return self.teacher_source.tensors()

    def load_teacher_state(self, tensors: dict[str, Tensor]) -> None:
        if TEACHER_RECORD[0] in tensors:
            self.keep_teacher(TeacherSource.from_tensors(tensors))

    def keep_teacher(self, saved: TeacherSource) -> None:
        """Distil the teacher the run started with. The stage resolved `stage.teacher` again when
        it was built; where that is another step directory now, the recorded one is loaded (the
        discriminator's trunk and the student came from it), and a recorded directory that is
        gone or holds other weights than it did is refused. A changed `stage.teacher` (only
        checkpoint.allow_config_change lets one through) is the user's choice and stays."""
        if saved == self.teacher_source or saved.name != self.stage_cfg.teacher:
            return
        now = recorded_sha256(saved.directory)
        if now != saved.sha256:
            what = "is gone" if now is None else "holds other weights now (its ema.safetensors changed)"
            raise ConfigError("stage.teacher", f"this run started distilling {saved.directory} "
                              f"(stage.teacher={self.stage_cfg.teacher}), which {what}; a resume must distil the "
                              f"teacher it started with. Restore that checkpoint, or distil "
                              f"{self.teacher_source.directory} in a new run (another checkpoint.dir)")
        with torch.random.fork_rng(devices=[]):  # the resume restored the global generator already
            self.teacher, _, _ = load_teacher(saved.directory, self.model_cfg, self.diffusion, self.data,
                                              self.text.dim, self.text.pooled_dim)
        place(self.teacher.net, self.device, self.helper_dtype)
        self.teacher_source = saved
        self.note(f"stage.teacher={self.stage_cfg.teacher} resolves to another checkpoint now; this run goes "
                  f"on distilling {saved.directory}, the teacher it started with")

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
        steps = log.sample_steps if self.teacher.uses_cfg else self.teacher.steps or 1
        settings = SamplerSettings(steps=steps, cfg_scale=log.sample_cfg)
        return self.bundle.sample_pixels(self.teacher.net, prompts, settings, generator,
                                         distilled=not self.teacher.uses_cfg)

    def student_pixels(self, net: nn.Module, prompts: Sequence[str], steps: int, log: LogConfig) -> Tensor:
        """The student at `steps` steps (fixed seed): one forward per step, no CFG."""
        settings = SamplerSettings(steps=steps, cfg_scale=log.sample_cfg)
        return self.bundle.sample_pixels(net, prompts, settings, torch.Generator().manual_seed(0), distilled=True)

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """Rows: the current teacher, then the student at 1, 2 and 4 steps (fixed seed)."""
        net = self.sampling_net(weights)
        prompts = list(log.prompts)
        rows = [self.teacher_pixels(prompts, log, torch.Generator().manual_seed(0))]
        sampler = f"{log.sample_steps} steps, CFG" if self.teacher.uses_cfg else f"{self.teacher.steps} steps"
        labels = [f"teacher ({sampler}): {p}" for p in prompts]
        for steps in SAMPLE_STEPS:
            rows.append(self.student_pixels(net, prompts, steps, log))
            labels += [f"{steps} step{'s' if steps > 1 else ''}: {p}" for p in prompts]
        return save_grid(torch.cat(rows), labels, path, self.data.fps, cols=len(prompts))

    def eval_metrics(self, weights: Optional[dict[str, Tensor]], log: LogConfig) -> dict[str, float]:
        """The shapes judge (trainer.judge) on log.prompts at 1, 2 and 4 student steps:
        `eval/adherence/<n>step/<attribute>`. For the engine's log.eval_every hook."""
        from trainer.judge import judge

        net = self.sampling_net(weights)
        metrics: dict[str, float] = {}
        for steps in SAMPLE_STEPS:
            pixels = self.student_pixels(net, log.prompts, steps, log)
            metrics.update(judge(pixels, log.prompts).as_metrics(f"eval/adherence/{steps}step"))
        return metrics
