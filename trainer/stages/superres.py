"""Super-resolution stage of a cascade (Ho et al. 2021, "Cascaded Diffusion Models"; Imagen).

The model sees the low-resolution image upsampled to the target size and concatenated to its
noisy input. That low-resolution input is itself corrupted with noise of a sampled level s
(noise-conditioning augmentation), and s is a conditioning input, so at inference the cascade
can pick the level that best hides the base model's artefacts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from trainer.config import LogConfig
from trainer.diffusion import SamplerSettings, rand
from trainer.media import save_grid
from trainer.models.dit import upsample_like
from trainer.stages.pretrain import PretrainStage


class SuperResStage(PretrainStage):
    """Trains p(x_hi | x_lo, text); the schedule is shifted for the larger resolution (the
    bundle's shapes are those of data.sr_resolution: model.superres is set)."""

    preview_samples = 4  # the sample grid super-resolves the preview's low-resolution images

    def lowres_input(self, batch: dict[str, Any]) -> Tensor:
        """The low-resolution pair the loader delivers (`image_lr`, or `video_lr` for clips), encoded."""
        return self.autoencoder.encode(batch[f"{self.data.kind}_lr"]).float()

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        inputs, targets = super().prepare(batch, generator)  # x0 at the high resolution
        with torch.no_grad():
            lowres = self.lowres_input(batch)  # (B, C, H/k, W/k)
        level = rand((lowres.shape[0],), generator, lowres.device) * self.stage_cfg.noise_aug_max  # (B,)
        inputs.update(lowres=self.bundle.augment(lowres, level, generator), aug_level=level)
        return inputs, targets

    @torch.no_grad()
    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """The preview's first low-resolution inputs (top row) and their super-resolved samples
        (bottom row), sampled at the preview's own high-resolution shape: its bucket (aspect,
        clip length) may be any of the run's, not the configured square and data.num_frames."""
        if self.preview is None:
            return None
        lowres = self.lowres_input(self.preview)  # (n, C, h, w) or (n, C, F, h, w)
        prompts = list(self.preview["caption"])
        generator = torch.Generator().manual_seed(0)
        settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
        extras = self.bundle.upsample_extras(lowres, self.stage_cfg.noise_aug_sample, generator)
        high = self.bundle.sample_pixels(self.sampling_net(weights), prompts, settings, generator, extras,
                                         shape=self.input_shape(self.preview)[1:])
        low = upsample_like(self.decode(lowres), high)
        return save_grid(torch.cat([low, high]), ["input: " + p for p in prompts] + prompts, path, self.data.fps,
                         cols=len(prompts))

    def eval_metrics(self, weights: Optional[dict[str, Tensor]], log: LogConfig) -> dict[str, float]:
        """{}: a super-resolution model samples from low-resolution inputs, not prompts alone."""
        return {}
