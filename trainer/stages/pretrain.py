"""Text-to-image / text-to-video pretraining of a latent or pixel DiT.

v-prediction on a zero-terminal-SNR schedule by default (Lin et al. 2023), optional min-SNR
weighting (Hang et al. 2023), classifier-free-guidance dropout of the caption (Ho & Salimans
2022). Images in video mode are 1-frame clips, so one model trains jointly on both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from data_pipeline.errors import DataError
from trainer.config import DataConfig, DiffusionConfig, LogConfig, ModelConfig, StageConfig
from trainer.diffusion import NoiseSchedule, add_noise, diffusion_loss, randn, sample_timesteps, schedule_for_shape
from trainer.diffusion.schedules import shape_size
from trainer.media import save_grid
from trainer.metrics import timestep_bucket_losses
from trainer.models.autoencoder import build_autoencoder
from trainer.models.dit import build_dit, dit_preset
from trainer.models.text import CachedTextEncoder, TextEmbedding, build_text_encoder
from trainer.sampling import SamplerSettings, generate
from trainer.stages.base import PlayerLoss, Stage, cfg_keep, drop_text, frozen


def precompute_encoder(config: str, overrides: Sequence[str] = (), device: str = "cpu") -> Callable[[dict], dict]:
    """The run's frozen autoencoder and text encoder as a `dit data precompute` encoder
    (`--encoder trainer.stages.pretrain:precompute_encoder --encoder-arg config=RUN.yaml`):
    per sample `latent` (C, [F,] h, w), `text_emb` (L, Dt), `text_mask` (L,), `text_pooled` (Dp,),
    which training on the written shards uses instead of calling the encoders."""
    from trainer.config import load_config

    cfg = load_config(config, list(overrides))
    text = frozen(build_text_encoder(cfg.model.text)).to(device)
    autoencoder = frozen(build_autoencoder(cfg.model.autoencoder)).to(device)
    pixels_key = "video" if cfg.data.kind == "video" else "image"

    @torch.no_grad()
    def encode(batch: dict) -> dict[str, Tensor]:
        emb = text.encode(list(batch["caption"]))
        latent = autoencoder.encode(batch[pixels_key].to(device)).float()
        return {"latent": latent, "text_emb": emb.tokens, "text_mask": emb.mask, "text_pooled": emb.pooled}

    return encode


class PretrainStage(Stage):
    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, stage: StageConfig, data: DataConfig):
        super().__init__()
        self.model_cfg, self.diffusion, self.stage_cfg, self.data = model, diffusion, stage, data
        self.text = CachedTextEncoder(frozen(build_text_encoder(model.text)))
        self.autoencoder = frozen(build_autoencoder(model.autoencoder))  # PixelSpace when kind=none
        self.players = {"student": build_dit(model, self.text.dim, self.text.pooled_dim)}
        self._schedules: dict[tuple[float, int], NoiseSchedule] = {}
        if data.kind == "video":  # every clip length the loader can deliver must encode
            for frames in {data.num_frames, *data.frame_buckets}:
                self.latent_frames(frames)
        self.schedule = self.schedule_for(self.sample_shape())  # at the configured square shape

    def helpers(self) -> list[torch.nn.Module]:
        return [self.text.encoder, self.autoencoder]

    def to(self, device: torch.device, helper_dtype: torch.dtype = torch.float32) -> "PretrainStage":
        super().to(device, helper_dtype)
        self.text.clear()  # cached embeddings of the old device and dtype
        return self

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        """Side of the tensor the DiT sees: pixels, or latents after the autoencoder."""
        return self.data.resolution // self.autoencoder.downsample_factor

    def sample_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     frames: Optional[int] = None) -> tuple[int, ...]:
        """(C, h, w) or (C, F, h, w) of the DiT's input for `height` x `width` pixels (default:
        the configured square) and `frames` (default: data.num_frames; videos only)."""
        factor = self.autoencoder.downsample_factor
        multiple = factor * dit_preset(self.model_cfg.preset).patch
        for name, pixels in (("height", height), ("width", width)):
            if pixels is not None and (pixels <= 0 or pixels % multiple):
                raise ValueError(f"{name} {pixels} px is not a positive multiple of {multiple} (the autoencoder's "
                                 f"downsampling {factor} x the DiT's patch); pick a multiple of {multiple}")
        c = self.model_cfg.in_channels
        h = height // factor if height else self.resolution
        w = width // factor if width else self.resolution
        if self.data.kind != "video":
            if frames not in (None, 1):
                raise ValueError(f"frames={frames}: this is an image model (data.kind=image)")
            return c, h, w
        return c, self.latent_frames(frames or self.data.num_frames), h, w

    def latent_frames(self, frames: int) -> int:
        """Frames the DiT sees for a clip of `frames`: all of them, or 1 + (F - 1) / t after a
        causal 3-D autoencoder that compresses time by t (frame 0 alone, then groups of t)."""
        t = self.autoencoder.temporal_downsample
        if (frames - 1) % t:
            raise ValueError(f"{frames} frames: the causal 3-D autoencoder compresses time by {t}, so clips have "
                             f"1 + {t} k frames (data.num_frames, data.frame_buckets, --frames)")
        return 1 + (frames - 1) // t

    def schedule_for(self, shape: Sequence[int]) -> NoiseSchedule:
        """The noise schedule of samples shaped `shape` (C, [F,] h, w): its SNR shift follows that
        shape's sqrt(h w) and frame count (`schedule_for_shape`), so each bucket of a batch is
        noised, and each size sampled, with its own shift. Cached per (side, frames)."""
        key = shape_size(shape)
        if key not in self._schedules:
            self._schedules[key] = schedule_for_shape(self.diffusion, shape)
        return self._schedules[key]

    def tokens_per_sample(self) -> int:
        spec = self.players["student"].spec
        frames = self.latent_frames(self.data.num_frames) // spec.temporal_patch if self.data.kind == "video" else 1
        return frames * (self.resolution // spec.preset.patch) ** 2

    def macs_per_sample(self) -> int:
        return self.players["student"].macs((1, *self.sample_shape()), self.text.max_length)

    # ---- data -> x0 -------------------------------------------------------------------------
    @torch.no_grad()
    def clean_input(self, batch: dict[str, Any]) -> Tensor:
        """x0 in float32: precomputed latents, or pixels (encoded when the model is latent)."""
        if "latent" in batch:
            return batch["latent"].float()
        return self.autoencoder.encode(batch["video"] if self.data.kind == "video" else batch["image"]).float()

    def text_input(self, batch: dict[str, Any]) -> TextEmbedding:
        """The captions' embeddings: precomputed ones from latent shards (`text_emb`, `text_mask`,
        `text_pooled`: the encoder is not called), else the frozen encoder's (cached)."""
        if "text_emb" not in batch:
            with torch.no_grad():
                return self.text.encode(batch["caption"])
        missing = [k for k in ("text_mask", "text_pooled") if k not in batch]
        if missing:
            raise DataError(f"precomputed text embeddings lack {', '.join(missing)}; precompute with "
                            f"trainer.stages.pretrain:precompute_encoder (it writes text_emb, text_mask, text_pooled)")
        tokens, pooled = batch["text_emb"].float(), batch["text_pooled"].float()  # (B, L, Dt), (B, Dp)
        if tokens.shape[1:] != (self.text.max_length, self.text.dim) or pooled.shape[1:] != (self.text.pooled_dim,):
            raise DataError(f"precomputed text embeddings are {tuple(tokens.shape[1:])} + {tuple(pooled.shape[1:])}, "
                            f"the configured encoder gives ({self.text.max_length}, {self.text.dim}) + "
                            f"({self.text.pooled_dim},); precompute with this run's model.text")
        return TextEmbedding(tokens, batch["text_mask"].bool(), pooled)

    def condition(self, batch: dict[str, Any], generator: torch.Generator) -> TextEmbedding:
        """The batch's text embeddings with CFG dropout (`stage.cfg_dropout`) applied on the device."""
        text = self.text_input(batch)
        if self.stage_cfg.cfg_dropout <= 0:
            return text
        B = text.tokens.shape[0]
        keep = cfg_keep(B, self.stage_cfg.cfg_dropout, generator, self.device)  # (B,)
        return drop_text(text, self.text.null_embedding(B), keep)

    # ---- loss -------------------------------------------------------------------------------
    def noised(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        t = sample_timesteps(self.diffusion, x0.shape[0], generator, x0.device)  # (B,)
        eps = randn(tuple(x0.shape), generator, x0.device)
        alpha, sigma = self.schedule_for(x0.shape[1:]).alpha_sigma(t)  # (B,), (B,) at this batch's bucket
        return t, eps, alpha, sigma, add_noise(x0, eps, alpha, sigma)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """Network inputs and loss targets of one batch: (x_t, t, text, extras),
        (x0, eps, x_t, alpha, sigma, weight); weight 0 marks the loader's padding repeats."""
        x0 = self.clean_input(batch)  # (B, C, h, w) or (B, C, F, h, w)
        text = self.condition(batch, generator)
        t, eps, alpha, sigma, x_t = self.noised(x0, generator)
        weight = batch["valid"].to(x0.dtype) if "valid" in batch else x0.new_ones(x0.shape[0])  # (B,)
        return {"x": x_t, "t": t, "text": text}, (x0, eps, x_t, alpha, sigma, weight)

    def weighted_loss(self, pred: Tensor, targets: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(scalar loss over the valid samples, per-sample loss (B,))."""
        x0, eps, x_t, alpha, sigma, weight = targets
        per_sample = diffusion_loss(pred, x0, eps, x_t, alpha, sigma, self.diffusion.prediction,
                                    self.diffusion.loss_weighting, self.diffusion.min_snr_gamma)  # (B,)
        return (per_sample * weight).sum() / weight.sum().clamp(min=1.0), per_sample

    def losses(self, batch: dict[str, Any], generator: torch.Generator) -> Iterator[PlayerLoss]:
        inputs, targets = self.prepare(batch, generator)
        extras = {k: v for k, v in inputs.items() if k not in ("x", "t", "text")}
        pred = self.run("student", inputs["x"], inputs["t"], inputs["text"], **extras)
        loss, per_sample = self.weighted_loss(pred, targets)
        yield "student", loss, {"loss": loss.detach(), **timestep_bucket_losses(per_sample.detach(), inputs["t"])}

    # ---- pipeline parallelism: noising before the pipe, the loss at its end -------------------
    def pipeline_batch(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[dict[str, Any], tuple[Tensor, ...]]:
        """The network's inputs by name (the engine packs them for the pipe) and the loss targets."""
        return self.prepare(batch, generator)

    def pipeline_loss(self, pred: Tensor, targets: tuple[Tensor, ...]) -> Tensor:
        return self.weighted_loss(pred, targets)[0]

    # ---- samples ----------------------------------------------------------------------------
    def sampling_net(self, weights: Optional[dict[str, Tensor]]) -> torch.nn.Module:
        """A plain (unpartitioned) copy of the student carrying `weights`."""
        net = build_dit(self.model_cfg, self.text.dim, self.text.pooled_dim)
        if weights is not None:
            net.load_state_dict(weights)  # strict: a missing weight is an error, never a default
        return net.to(self.device).eval()

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        return self.autoencoder.decode(x0)

    def write_samples(self, weights: Optional[dict[str, Tensor]], log: LogConfig, path: Path) -> Optional[Path]:
        net = self.sampling_net(weights)
        settings = SamplerSettings(steps=log.sample_steps, cfg_scale=log.sample_cfg)
        generator = torch.Generator().manual_seed(0)
        shape = self.sample_shape()
        x0 = generate(net, self.text, self.schedule_for(shape), self.diffusion.prediction, log.prompts,
                      shape, settings, generator)
        return save_grid(self.decode(x0), log.prompts, path)
