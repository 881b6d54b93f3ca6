"""The `stage:` section of a run config, and one typed config per stage kind.

The YAML section is one flat namespace (`StageConfig`), so that the config.yaml of any
checkpoint reads back whatever its kind. The typed config of its kind (`stage_settings`) holds
only the knobs that kind has; they are checked once, before any process starts, by
`validate_stage` (called from `trainer.config.validate`). A new stage kind adds its knobs to
`StageConfig` and one settings class to `STAGE_KINDS`. (Stages still receive the flat section:
the progressive stage writes it back into its round exports' config.yaml.)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from trainer.config_errors import check

if TYPE_CHECKING:
    from trainer.config import RunConfig


@dataclass
class StageConfig:
    kind: str = "pretrain"  # autoencoder | pretrain | superres | progressive | adversarial
    steps: int = 100
    cfg_dropout: float = 0.1  # probability that a caption is replaced by the null caption
    # superres: noise-conditioning augmentation level drawn from [0, max] (Ho et al. 2021)
    noise_aug_max: float = 0.5
    noise_aug_sample: float = 0.1  # the level used at inference
    # autoencoder: KL weight of the VAE loss
    kl_weight: float = 1e-6
    # distillation
    teacher: str = ""  # checkpoint directory of the teacher
    rounds: list[int] = field(default_factory=lambda: [8, 4])  # student step counts per round
    guidance_min: float = 1.0
    guidance_max: float = 4.0
    adv_loss: str = "hinge"  # hinge | non_saturating
    adv_mse_weight: float = 1.0
    max_nonfinite_in_row: int = 3  # abort after this many skipped (NaN/inf) steps in a row


@dataclass(frozen=True)
class StageSettings:
    """What every stage kind has."""

    kind: str
    steps: int
    max_nonfinite_in_row: int

    def check(self) -> None:
        check(self.steps >= 1, "stage.steps", "must be at least 1")


@dataclass(frozen=True)
class AutoencoderSettings(StageSettings):
    kl_weight: float


@dataclass(frozen=True)
class PretrainSettings(StageSettings):
    cfg_dropout: float

    def check(self) -> None:
        check(0.0 <= self.cfg_dropout < 1.0, "stage.cfg_dropout", "must be in [0, 1)")
        super().check()


@dataclass(frozen=True)
class SuperresSettings(PretrainSettings):
    noise_aug_max: float
    noise_aug_sample: float


@dataclass(frozen=True)
class ProgressiveSettings(PretrainSettings):
    teacher: str
    rounds: list[int]
    guidance_min: float
    guidance_max: float


@dataclass(frozen=True)
class AdversarialSettings(ProgressiveSettings):
    adv_loss: str
    adv_mse_weight: float


STAGE_KINDS: dict[str, type[StageSettings]] = {
    "autoencoder": AutoencoderSettings,
    "pretrain": PretrainSettings,
    "superres": SuperresSettings,
    "progressive": ProgressiveSettings,
    "adversarial": AdversarialSettings,
}


def stage_settings(stage: StageConfig) -> StageSettings:
    """The typed config of `stage.kind`, read from the section's knobs of that kind."""
    kind = STAGE_KINDS[stage.kind]
    return kind(**{f.name: getattr(stage, f.name) for f in fields(kind)})


def validate_stage(cfg: RunConfig) -> None:
    """The stage's own knobs, and what its kind rules out elsewhere in the config."""
    st = cfg.stage
    stage_settings(st).check()
    check(not (cfg.model.compile and st.kind == "autoencoder"), "model.compile",
          "compiles the DiT's blocks; the autoencoder stage trains no DiT (set it to false)")
    check(
        not (cfg.checkpoint.init_from and st.kind in ("autoencoder", "progressive", "adversarial")),
        "checkpoint.init_from",
        f"warm-starts the DiT of pretrain and superres stages; the {st.kind} stage "
        + ("starts its student from stage.teacher" if st.kind != "autoencoder" else "trains no DiT")
        + " (set checkpoint.init_from='')",
    )
    if st.kind == "superres":
        check(cfg.model.superres, "model.superres", "stage.kind=superres needs model.superres=true")
        check(
            cfg.data.sr_resolution > cfg.data.resolution,
            "data.sr_resolution",
            "the superres stage needs data.sr_resolution > data.resolution",
        )
    check(
        not (cfg.data.resolutions and st.kind in ("progressive", "adversarial")),
        "data.resolutions",
        f"the {st.kind} stage distils at the one schedule of data.resolution; multi-resolution buckets "
        f"train pretrain stages (set data.resolutions=[])",
    )
    check(
        not (cfg.data.resolutions and cfg.deepspeed.pipeline_stages > 1),
        "data.resolutions",
        "the pipeline engine exchanges activations of one shape; train multi-resolution buckets with ZeRO "
        "(deepspeed.pipeline_stages=1)",
    )
