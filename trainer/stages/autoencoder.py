"""Autoencoder stage: trains the KL autoencoder (Kingma & Welling 2014; LDM, Rombach et al.
2022) that latent DiTs run in, so the whole system works offline with no downloaded weights.

Loss: L1 + MSE reconstruction plus a small KL term (no perceptual or adversarial loss: those
need pretrained networks). The reconstruction is a mean over pixels and the KL a sum over latent
elements, where LDM sums both per image: a `stage.kl_weight` here is LDM's weight divided by
3 H W (the default 1e-6 is LDM's ~3e-3 at 32 px and ~0.2 at 256 px, not LDM's own 1e-6). At
the end the latent scale and shift are estimated from data (scale = 1 / std, as Stable
Diffusion's 0.18215) and saved with the weights to `model.autoencoder.path`, where the latent
stages load it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from trainer.config import AutoencoderConfig, DataConfig, LogConfig, RunConfig
from trainer.diffusion.distill import masked_mean
from trainer.diffusion.utils import Generators, randn_like
from trainer.media import save_image_grid
from trainer.metrics import valid_mean
from trainer.models.autoencoder import Autoencoder, build_kl
from trainer.stage_config import AutoencoderSettings
from trainer.stages.base import PlayerLoss, Stage


RECON_JUDGED = 256  # held-out images whose reconstructions the shapes judge reads at the end
RECON_REPORT = "reconstruction_adherence.json"  # written beside the weights in model.autoencoder.path


@torch.no_grad()
def reconstruction_adherence(ae: Autoencoder, data: DataConfig, num: int = RECON_JUDGED, batch_size: int = 64):
    """The shapes judge (`trainer.judge`) on the autoencoder's reconstructions of `num` held-out
    images, each against its own caption: what of a shape survives the latent space. A latent
    DiT cannot learn an attribute its autoencoder loses, so every attribute should stay >= 95%."""
    from trainer.heldout import heldout_set
    from trainer.judge import judge

    real, captions = heldout_set(data, num)
    device = next(ae.parameters()).device
    recon = torch.cat([ae.decode(ae.encode(real[i: i + batch_size].to(device))).cpu()
                       for i in range(0, len(real), batch_size)])
    return judge(recon.clamp(-1, 1), captions)


class VAETraining(nn.Module):
    """The training forward of a KL autoencoder: encode, sample the posterior, decode."""

    def __init__(self, ae: Autoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, x: Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
        posterior = self.ae.vae.encode(x).latent_dist  # its mean and (clamped) logvar in the weights' dtype
        mean, logvar = posterior.mean.float(), posterior.logvar.float()  # (B, c, H/f, W/f): noise and KL in float32
        z = mean + torch.exp(0.5 * logvar) * randn_like(mean, generator)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))  # (B,) KL to N(0, I)
        return self.ae.vae.decode(z).sample, kl  # (B, 3, H, W), (B,)


class AutoencoderStage(Stage):
    preview_samples = 32  # the latent scale is fit on, and the grid drawn from, these images

    @classmethod
    def from_config(cls, cfg: RunConfig, settings: AutoencoderSettings) -> "AutoencoderStage":
        return cls(cfg.model.autoencoder, settings, cfg.data)

    def __init__(self, cfg: AutoencoderConfig, stage: AutoencoderSettings, data: DataConfig):
        super().__init__()
        self.cfg, self.stage_cfg, self.data = cfg, stage, data
        self.players = {"student": VAETraining(Autoencoder(build_kl(cfg)))}

    def pixels(self, batch: dict[str, Any]) -> Tensor:
        """Images (B, 3, H, W); a video's frames are images of the same (2-D) autoencoder."""
        if self.data.kind != "video":
            return batch["image"]
        video = batch["video"]  # (B, 3, F, H, W)
        return video.transpose(1, 2).flatten(0, 1)  # (B F, 3, H, W)

    def frame_generators(self, batch: dict[str, Any], generators: Generators) -> Generators:
        """One generator per image of `pixels`: a clip's F frames draw in turn from its sample's
        generator, so each frame's posterior sample still depends only on the sample (a single
        generator serves every frame as it is)."""
        if self.data.kind != "video" or not isinstance(generators, list):
            return generators
        frames = batch["video"].shape[2]
        return [g for g in generators for _ in range(frames)]  # (B F) generators

    def image_weight(self, batch: dict[str, Any], x: Tensor) -> Tensor:
        """1 for the images of real samples, 0 for those of the loader's padding repeats
        (`batch["valid"]`): a clip's F frames share its sample's. (N,), N as in `pixels`."""
        if "valid" not in batch:
            return x.new_ones(x.shape[0])
        valid = batch["valid"].to(x.dtype)  # (B,)
        return valid.repeat_interleave(x.shape[0] // valid.shape[0])  # (N,)

    def losses(self, batch: dict[str, Any], generator: Generators) -> Iterator[PlayerLoss]:
        x = self.pixels(batch)  # (N, 3, H, W) in [-1, 1], N = B, or B F for clips
        recon, kl = self.run("student", x, self.frame_generators(batch, generator))  # (N, 3, H, W), (N,)
        weight = self.image_weight(batch, x)  # (N,)
        # L1 + MSE per image, averaged over the valid ones (padding repeats would train twice)
        rec = masked_mean((recon - x).abs().mean((1, 2, 3)) + (recon - x).square().mean((1, 2, 3)), weight)
        kl_mean = masked_mean(kl, weight)
        loss = rec + self.stage_cfg.kl_weight * kl_mean
        yield "student", loss, {"loss": valid_mean(loss, weight), "recon": valid_mean(rec, weight),
                                "kl": valid_mean(kl_mean, weight)}

    def trained_copy(self, weights: dict[str, Tensor]) -> Autoencoder:
        trainer = VAETraining(Autoencoder(build_kl(self.cfg)))
        missing, unexpected = trainer.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"ae.scale", "ae.shift"}:  # the buffers are refit below
            raise ValueError(f"autoencoder weights do not fit: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        return trainer.ae.to(self.device).eval()

    @torch.no_grad()
    def write_samples(self, weights: dict[str, Tensor], log: LogConfig, path: Path) -> Optional[Path]:
        """Fit the latent scale on the preview's images, save the autoencoder for the latent
        stages, and draw originals above reconstructions. The preview is the same at every step
        and on resume, so a resumed run saves the autoencoder an uninterrupted one saves."""
        if self.preview is None:
            return None
        ae = self.trained_copy(weights)
        images = self.pixels(self.preview)  # (N, 3, H, W); a clip's frames are images
        ae.fit_scale(images)
        ae.save(self.cfg.path)
        recon = ae.decode(ae.encode(images[:8]))
        if self.data.kind != "video":
            report = reconstruction_adherence(ae, self.data, RECON_JUDGED)
            record = {"num": report.num_samples, "accuracy": report.accuracy,
                      "interval": {k: list(report.interval(k)) for k in report.accuracy}}
            (Path(self.cfg.path) / RECON_REPORT).write_text(json.dumps(record, indent=1) + "\n")
            print(f"autoencoder reconstructions of {report.num_samples} held-out images, judged: "
                  f"{report.format(intervals=True)}", flush=True)
        grid = torch.cat([images[:8], recon])
        labels = ["original"] * min(8, len(images)) + ["reconstruction"] * recon.shape[0]
        return save_image_grid(grid, labels, path, cols=min(8, len(images)), caption_lines=1)
