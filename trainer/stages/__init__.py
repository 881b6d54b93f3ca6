"""Training stages, chosen by `stage.kind`; each receives only the sub-configs it needs and the
typed settings of its kind (`trainer.stage_config.STAGE_KINDS`)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainer.config import RunConfig
from trainer.stage_config import stage_settings
from trainer.stages.checks import (PREFLIGHT, check_autoencoder_given, check_autoencoder_settings,
                                   check_autoencoder_target, check_init_source, check_latent_sources,
                                   note_late_stall_watch, note_switched_off, note_untrained_null)
from trainer.models.text_source import check_text_source

if TYPE_CHECKING:
    from trainer.stages.base import Stage

# stage.kind -> the class that trains it ("module:class"), imported only when chosen.
STAGES: dict[str, str] = {
    "autoencoder": "trainer.stages.autoencoder:AutoencoderStage",
    "pretrain": "trainer.stages.pretrain:PretrainStage",
    "superres": "trainer.stages.superres:SuperResStage",
    "progressive": "trainer.stages.progressive:ProgressiveStage",
    "adversarial": "trainer.stages.adversarial:AdversarialStage",
}


def stage_class(kind: str) -> type[Stage]:
    if kind not in STAGES:
        raise NotImplementedError(f"stage.kind={kind} is not available in this build")
    module, name = STAGES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def preflight(cfg: RunConfig, queued: bool = False) -> None:
    """Checks from configs and the files they name (no network built, no process group, no
    torch imported): `dit train` and `dit launch` run them first, so a bad distillation config,
    or latents made by other encoders or pixel settings, fail in about a second with the key
    named (ConfigError) instead of after DeepSpeed started. `queued`: the job runs later (a
    SLURM submission), when an earlier job may have written the autoencoder it reads."""
    check_autoencoder_given(cfg, queued)
    check_autoencoder_settings(cfg)
    check_autoencoder_target(cfg)
    check_latent_sources(cfg)
    check_init_source(cfg)
    check_text_source(cfg.model.text)
    note_switched_off(cfg)
    note_untrained_null(cfg)
    note_late_stall_watch(cfg)
    if cfg.stage.kind in PREFLIGHT:
        PREFLIGHT[cfg.stage.kind](cfg)


def build_stage(cfg: RunConfig) -> Stage:
    return stage_class(cfg.stage.kind).from_config(cfg, stage_settings(cfg.stage))
