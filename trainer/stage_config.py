"""The `stage:` section of a run config: one typed config per stage kind.

Each kind's knobs, their defaults and their checks live in one settings class here
(`STAGE_KINDS`); the stage of that kind receives only that class (`stage_settings`). The YAML
section is one flat namespace (`StageConfig`, made from the union of the kinds' fields), so
that the config.yaml of any checkpoint reads back whatever its kind, and a knob of another kind
keeps its default. Every check runs once, before any process starts, from
`trainer.config.validate` (`validate_stage`).

A new stage kind is one settings class below (registered in `STAGE_KINDS`) and one stage file
registered in `trainer.stages.STAGES`; checks that read files (a teacher's config.yaml) go in
`trainer.stages.checks.PREFLIGHT`, which imports no torch.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from trainer.config_errors import ConfigError, check

if TYPE_CHECKING:
    from trainer.config import RunConfig


@dataclass(frozen=True)
class StageSettings:
    """What every stage kind has."""

    kind: str = "pretrain"  # autoencoder | pretrain | superres | progressive | adversarial
    steps: int = 100
    max_nonfinite_in_row: int = 3  # abort after this many skipped (NaN/inf) steps in a row

    # What a kind's student allows of the layout: DeepSpeed pipeline stages of its DiT, and
    # sequence parallelism (trainer/sequence_parallel.py) over its tokens.
    pipeline: ClassVar[bool] = False
    sequence_parallel: ClassVar[bool] = False
    # Where the student comes from: "" when `checkpoint.init_from` may warm-start it, else why not.
    student_from: ClassVar[str] = "trains no DiT"
    # The DiT inputs (model.<key> flags) this kind's stage feeds its student: a flag the stage
    # does not feed builds a network whose first forward fails (a missing `lowres`/`guidance`).
    dit_inputs: ClassVar[tuple[str, ...]] = ()
    # What the kind's sample grids and adherence figures draw: a DiT sampled at log.sample_steps
    # with log.sample_cfg (`samples_dit`), from log.prompts (`draws_prompts`).
    samples_dit: ClassVar[bool] = False
    draws_prompts: ClassVar[bool] = False
    # Whether the kind noises its inputs at times drawn by diffusion.timestep_sampler (the
    # distillation stages draw their student's steps; the autoencoder stage, no times).
    draws_timesteps: ClassVar[bool] = False

    def check(self, cfg: RunConfig) -> None:
        check(self.steps >= 1, "stage.steps", "must be at least 1")
        check(self.max_nonfinite_in_row >= 1, "stage.max_nonfinite_in_row",
              f"must be at least 1, the skipped (non-finite) steps in a row that stop the run: 1 stops at the "
              f"first, and there is no value that never stops (got {self.max_nonfinite_in_row})")
        if self.samples_dit:
            log, timesteps = cfg.log, cfg.diffusion.num_timesteps
            check(1 <= log.sample_steps <= timesteps, "log.sample_steps",
                  f"must be in [1, diffusion.num_timesteps={timesteps}], the sampler steps of the sample grids "
                  f"(got {log.sample_steps}): the run trained and saved, then failed drawing its grid")
            check(log.sample_cfg >= 0, "log.sample_cfg",
                  f"must be >= 0, the guidance scale of the sample grids (got {log.sample_cfg:g})")
        check(not self.draws_prompts or len(cfg.log.prompts) >= 1, "log.prompts",
              f"the {self.kind} stage's sample grids and adherence figures draw these prompts; list at least one "
              f"(with none the run trained and saved, then failed at its grid)")
        for key in DIT_INPUTS:
            takers = [name for name, kind in STAGE_KINDS.items() if key in kind.dit_inputs]
            check(not getattr(cfg.model, key) or key in self.dit_inputs, f"model.{key}",
                  f"is an input of the {listing(takers)} students; the {self.kind} stage does not feed it "
                  f"(set model.{key}=false)")
        check(not (cfg.checkpoint.init_from and self.student_from), "checkpoint.init_from",
              f"warm-starts the DiT of pretrain and superres stages; the {self.kind} stage "
              f"{self.student_from} (set checkpoint.init_from='')")


@dataclass(frozen=True)
class AutoencoderSettings(StageSettings):
    kl_weight: float = 1e-6  # the summed KL against a per-pixel mean reconstruction: LDM's weight / (3 H W)

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        for key in ("compile", "flat_params"):
            check(not getattr(cfg.model, key), f"model.{key}",
                  "acts on the DiT's blocks; the autoencoder stage trains no DiT (set it to false)")
        check(self.kl_weight >= 0, "stage.kl_weight",
              f"must be >= 0: a negative weight makes the loss reward the KL it should keep small (got {self.kl_weight})")


@dataclass(frozen=True)
class PretrainSettings(StageSettings):
    cfg_dropout: float = 0.1  # probability that a caption is replaced by the null caption

    pipeline: ClassVar[bool] = True
    sequence_parallel: ClassVar[bool] = True
    student_from: ClassVar[str] = ""
    samples_dit: ClassVar[bool] = True
    draws_prompts: ClassVar[bool] = True
    draws_timesteps: ClassVar[bool] = True

    def check(self, cfg: RunConfig) -> None:
        check(0.0 <= self.cfg_dropout < 1.0, "stage.cfg_dropout", "must be in [0, 1)")
        super().check(cfg)


@dataclass(frozen=True)
class SuperresSettings(PretrainSettings):
    # Noise-conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models"): the
    # low-resolution input is noised to a level drawn from [0, max]; `sample` is the level at inference.
    noise_aug_max: float = 0.5
    noise_aug_sample: float = 0.1

    dit_inputs: ClassVar[tuple[str, ...]] = ("superres",)
    draws_prompts: ClassVar[bool] = False  # its grids sample the preview batch's own captions

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        check(cfg.model.superres, "model.superres", "stage.kind=superres needs model.superres=true")
        check(cfg.data.sr_resolution > cfg.data.resolution, "data.sr_resolution",
              "the superres stage needs data.sr_resolution > data.resolution")
        check(0.0 <= self.noise_aug_max <= 1.0, "stage.noise_aug_max",
              f"must be in [0, 1], the largest noise level of the low-resolution input (got {self.noise_aug_max})")
        check(0.0 <= self.noise_aug_sample <= self.noise_aug_max, "stage.noise_aug_sample",
              f"must be in [0, stage.noise_aug_max={self.noise_aug_max}]: the level sampled with must be one the "
              f"model trained at (got {self.noise_aug_sample})")


@dataclass(frozen=True)
class ProgressiveSettings(PretrainSettings):
    teacher: str = ""  # checkpoint directory of the teacher
    rounds: list[int] = field(default_factory=lambda: [8, 4])  # student step counts per round
    guidance_min: float = 1.0  # w ~ U[min, max] per sample (Meng et al. 2023); one w without model.guidance_embed
    guidance_max: float = 4.0

    sequence_parallel: ClassVar[bool] = False
    student_from: ClassVar[str] = "starts its student from stage.teacher"
    draws_timesteps: ClassVar[bool] = False
    # Not superres: neither the teacher's targets nor the student's forward get a low-resolution
    # input (`lowres`, `aug_level`), so a super-resolution DiT fails at its first forward.
    dit_inputs: ClassVar[tuple[str, ...]] = ("guidance_embed",)

    def check(self, cfg: RunConfig) -> None:
        super().check(cfg)
        check(not cfg.data.resolutions, "data.resolutions",
              f"the {self.kind} stage distils at the one schedule of data.resolution; multi-resolution "
              f"buckets train pretrain stages (set data.resolutions=[])")
        check(0.0 <= self.guidance_min <= self.guidance_max, "stage.guidance_min",
              f"w ~ U[stage.guidance_min, stage.guidance_max] needs 0 <= min <= max (got {self.guidance_min}, "
              f"{self.guidance_max})")
        check(not cfg.model.guidance_embed or self.guidance_min <= cfg.log.sample_cfg <= self.guidance_max,
              "log.sample_cfg", f"{cfg.log.sample_cfg:g} is the guidance input the sample grids and the adherence "
                                f"figures give the student, which learns w on [{self.guidance_min:g}, "
                                f"{self.guidance_max:g}] (stage.guidance_min/max): use a w within that range")


@dataclass(frozen=True)
class AdversarialSettings(ProgressiveSettings):
    adv_loss: str = "hinge"  # hinge | non_saturating
    adv_mse_weight: float = 1.0

    pipeline: ClassVar[bool] = False


DIT_INPUTS = ("superres", "guidance_embed")  # the model flags a stage kind may or may not feed

STAGE_KINDS: dict[str, type[StageSettings]] = {
    "autoencoder": AutoencoderSettings,
    "pretrain": PretrainSettings,
    "superres": SuperresSettings,
    "progressive": ProgressiveSettings,
    "adversarial": AdversarialSettings,
}


def distilled_steps(stage: Any, round_index: Optional[int] = None) -> Optional[int]:
    """The step count a distillation checkpoint's student samples with (`stage`: a run's
    StageConfig); None for other kinds.

    A progressive run's student changes step count at each round boundary, so a step directory
    saved mid-run holds the student of round `round_index` (0-based; the checkpoint's
    stage.safetensors records it: trainer.stages.progressive, `trainer.checkpoint_format.student_round`).
    None: the last round listed, right for a round export (its config's rounds end at its own
    round) and for a single-round run; a mid-run step directory must pass its round."""
    if stage.kind == "progressive":
        rounds = list(stage.rounds)
        if round_index is None:
            return rounds[-1]
        if not 0 <= round_index < len(rounds):
            raise ConfigError("stage.rounds", f"{rounds} has no round {round_index + 1}, the round this "
                                              f"checkpoint's student was trained in")
        return rounds[round_index]
    if stage.kind == "adversarial":
        return max(stage.rounds)
    return None


def _section_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, field) of every kind's knobs, each once, in the order the kinds declare them."""
    seen: dict[str, tuple[str, Any, Any]] = {}
    for kind in STAGE_KINDS.values():
        for f in fields(kind):
            if f.name not in seen:
                default = (field(default_factory=f.default_factory) if f.default is MISSING
                           else field(default=f.default))
                seen[f.name] = (f.name, f.type, default)
    return list(seen.values())


# The YAML `stage:` section: every kind's knobs in one flat, mutable dataclass.
StageConfig = make_dataclass("StageConfig", _section_fields())
StageConfig.__module__ = __name__
StageConfig.__doc__ = "The `stage:` section: the union of the stage kinds' knobs (see STAGE_KINDS)."


def stage_settings(stage: Any) -> StageSettings:
    """The typed config of `stage.kind`, read from the section's knobs of that kind."""
    kind = STAGE_KINDS[stage.kind]
    return kind(**{f.name: getattr(stage, f.name) for f in fields(kind)})


def as_section(settings: StageSettings) -> Any:
    """A kind's typed config back as a `stage:` section (other kinds' knobs at their defaults)."""
    return StageConfig(**{f.name: getattr(settings, f.name) for f in fields(settings)})


def validate_stage(cfg: RunConfig) -> None:
    """The stage's own knobs, and what its kind rules out elsewhere in the config."""
    check_foreign_knobs(cfg.stage)
    check_discriminator_rate(cfg)
    settings = stage_settings(cfg.stage)
    settings.check(cfg)
    check(not (cfg.deepspeed.pipeline_stages > 1 and not settings.pipeline), "deepspeed.pipeline_stages",
          f"pipeline parallelism splits the DiT student of the {listing(supporting('pipeline'))} "
          f"stages; the {settings.kind} stage trains another network (use ZeRO: deepspeed.pipeline_stages=1)")
    check(not (cfg.data.resolutions and cfg.deepspeed.pipeline_stages > 1), "data.resolutions",
          "the pipeline engine exchanges activations of one shape; train multi-resolution buckets with ZeRO "
          "(deepspeed.pipeline_stages=1)")


def check_guidance_input(cfg: RunConfig) -> None:
    """A distillation student without the guidance input (model.guidance_embed=false) takes no
    w: drawn from a range, the teacher's targets at random w would teach it their blend, a
    guidance scale nobody chose that `dit sample --cfg` cannot change. One w is baked in."""
    stage = cfg.stage
    if not issubclass(STAGE_KINDS[stage.kind], ProgressiveSettings) or cfg.model.guidance_embed:
        return
    check(stage.guidance_min == stage.guidance_max, "stage.guidance_max",
          f"model.guidance_embed=false: the student takes no guidance input, so targets the teacher draws at w on "
          f"[{stage.guidance_min:g}, {stage.guidance_max:g}] would teach it their blend, a guidance scale nobody "
          f"chose (and `dit sample --cfg` cannot change it): set stage.guidance_min = stage.guidance_max = the w to "
          f"bake in (1: no guidance; a teacher distilled without a guidance input takes no w either), or "
          f"model.guidance_embed=true to condition the student on w")


def check_discriminator_rate(cfg: RunConfig) -> None:
    """optim.disc_lr is the adversarial stage's second optimizer; other kinds have none."""
    check(cfg.stage.kind == "adversarial" or cfg.optim.disc_lr == type(cfg.optim)().disc_lr, "optim.disc_lr",
          f"is the discriminator's rate of the adversarial stage; the {cfg.stage.kind} stage has no discriminator "
          f"and ignores it (remove it, or set stage.kind=adversarial)")


def check_foreign_knobs(stage: Any) -> None:
    """A knob of another kind set away from its default: the stage of `stage.kind` receives
    only its own settings class, so it would ignore the value silently; refused, naming the key."""
    own = {f.name for f in fields(STAGE_KINDS[stage.kind])}
    defaults = StageConfig()
    for f in fields(StageConfig):
        if f.name in own or getattr(stage, f.name) == getattr(defaults, f.name):
            continue
        kinds = [name for name, kind in STAGE_KINDS.items() if f.name in {g.name for g in fields(kind)}]
        raise ConfigError(f"stage.{f.name}", f"is a setting of the {listing(kinds)} stage(s); the {stage.kind} "
                                             f"stage ignores it (remove it, or set stage.kind to one that uses it)")


def listing(names: Sequence[str]) -> str:
    """`names` as a list in words: "a", "a and b", "a, b and c"."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def supporting(feature: str) -> list[str]:
    """The stage kinds whose settings allow `feature` ('pipeline', 'sequence_parallel')."""
    return [name for name, kind in STAGE_KINDS.items() if getattr(kind, feature)]
