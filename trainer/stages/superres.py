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
from trainer.diffusion import add_noise, rand, randn
from trainer.media import save_grid
from trainer.models.dit import upsample_like
from trainer.sampling import SamplerSettings, generate
from trainer.stages.pretrain import PretrainStage


class SuperResStage(PretrainStage):
    """Trains p(x_hi | x_lo, text); the schedule is shifted for the larger resolution."""

    preview_samples = 4  # the sample grid super-resolves the preview's low-resolution images

    @property
    def resolution(self) -> int:
        return self.data.sr_resolution // self.autoencoder.downsample_factor

    def lowres_input(self, batch: dict[str, Any]) -> Tensor:
        """The low-resolution pair the loader delivers (`image_lr`, or `video_lr` for clips), encoded."""
        return self.autoencoder.encode(batch[f"{self.data.kind}_lr"]).float()

    def augment(self, lowres: Tensor, level: Tensor, generator: torch.Generator) -> Tensor:
        """Noise-conditioning augmentation: x_lo at diffusion time `level` of the same schedule."""
        alpha, sigma = self.schedule.alpha_sigma(level)
        return add_noise(lowres, randn(tuple(lowres.shape), generator, lowres.device), alpha, sigma)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        inputs, targets = super().prepare(batch, generator)  # x0 at the high resolution
        with torch.no_grad():
            lowres = self.lowres_input(batch)  # (B, C, H/k, W/k)
        level = rand((lowres.shape[0],), generator, lowres.device) * self.stage_cfg.noise_aug_max  # (B,)
        inputs.update(lowres=self.augment(lowres, level, generator), aug_level=level)
        return inputs, targets

    def upsample_extras(self, lowres: Tensor, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        """The conditioning of one super-resolution call at inference (fixed augmentation level)."""
        level = torch.full((lowres.shape[0],), self.stage_cfg.noise_aug_sample, device=lowres.device)
        return {"lowres": self.augment(lowres, level, generator), "aug_level": level}

    @torch.no_grad()
    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        """The preview's first low-resolution inputs (top row) and their super-resolved samples
        (bottom row)."""
        if self.preview is None:
            return None
        lowres = self.lowres_input(self.preview)  # (n, C, h, w) or (n, C, F, h, w)
        prompts = list(self.preview["caption"])
        generator = torch.Generator().manual_seed(0)
        settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
        x0 = generate(self.sampling_net(weights), self.text, self.schedule, self.diffusion.prediction, prompts,
                      self.sample_shape(), settings, generator, self.upsample_extras(lowres, generator))
        high = self.decode(x0)
        low = upsample_like(self.decode(lowres), high)
        return save_grid(torch.cat([low, high]), ["input: " + p for p in prompts] + prompts, path, cols=len(prompts))
