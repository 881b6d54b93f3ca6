"""Training stages, chosen by `stage.kind`; each receives only the sub-configs it needs."""
from __future__ import annotations

from pathlib import Path

from trainer.config import RunConfig
from trainer.stages.base import Stage


def preflight(cfg: RunConfig) -> None:
    """Stage-specific checks from configs alone (no network built, no process group): `dit
    train` and `dit launch` run them first, so a bad distillation config fails in seconds with
    the key named (ConfigError) instead of after DeepSpeed started."""
    if cfg.stage.kind in ("progressive", "adversarial"):
        from trainer.stages.progressive import check_distillation

        check_distillation(cfg)


def build_stage(cfg: RunConfig) -> Stage:
    kind = cfg.stage.kind
    if kind == "autoencoder":
        from trainer.stages.autoencoder import AutoencoderStage

        return AutoencoderStage(cfg.model.autoencoder, cfg.stage, cfg.data)
    if kind == "pretrain":
        from trainer.stages.pretrain import PretrainStage

        return PretrainStage(cfg.model, cfg.diffusion, cfg.stage, cfg.data)
    if kind == "superres":
        from trainer.stages.superres import SuperResStage

        return SuperResStage(cfg.model, cfg.diffusion, cfg.stage, cfg.data)
    if kind in ("progressive", "adversarial"):
        from trainer.stages.adversarial import AdversarialStage
        from trainer.stages.progressive import ROUNDS_DIR, ProgressiveStage

        if kind == "progressive":
            exports = Path(cfg.checkpoint.dir) / ROUNDS_DIR
            return ProgressiveStage(cfg.model, cfg.diffusion, cfg.stage, cfg.data, exports)
        return AdversarialStage(cfg.model, cfg.diffusion, cfg.stage, cfg.data, cfg.log.sample_steps)
    raise NotImplementedError(f"stage.kind={kind} is not available in this build")
