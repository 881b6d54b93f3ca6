"""Training stages, chosen by `stage.kind`; each receives only the sub-configs it needs."""
from __future__ import annotations

from trainer.config import RunConfig
from trainer.stages.base import Stage


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
    raise NotImplementedError(f"stage.kind={kind} is not available in this build")
