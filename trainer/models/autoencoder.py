"""Autoencoders for latent diffusion (Rombach et al. 2022): a diffusers VAE + latent normalization.

    ae = build_autoencoder(cfg.model.autoencoder)      # AutoencoderKL from config or a local dir
    z = ae.encode(x)        # (B, 3, H, W) -> (B, c, H/f, W/f); videos (B, 3, F, H, W) frame by frame
    x = ae.decode(z)
    ae.fit_scale(batches)   # shift = mean, scale = 1 / std of the raw latents (SD's scaling_factor)
    ae.save(dir); Autoencoder.load(dir)

z = (latent - shift) * scale, so the DiT sees roughly unit-variance latents. The statistics are
stored with the weights: `dir` is a diffusers model folder (config.json +
diffusion_pytorch_model.safetensors, with scaling_factor / shift_factor set for AutoencoderKL)
plus `latent_norm.json`. A downloaded diffusers VAE folder (no latent_norm.json) uses its
config's scaling_factor and shift_factor.

Videos: a 2-D AutoencoderKL encodes them frame by frame; a causal 3-D autoencoder from diffusers
(AutoencoderKLWan-style: frame 0 alone, then groups of `temporal_downsample` frames) also
compresses time, F -> 1 + (F - 1) / temporal_downsample.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from trainer.checkpoint_format import replace_dir, temporary_dir
from trainer.config import NORM_FILE, AutoencoderConfig

# Causal video autoencoders of diffusers that take (B, C, F, H, W) whole.
CAUSAL_3D = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo", "AutoencoderKLHunyuanVideo")
SUPPORTED = ("AutoencoderKL", *CAUSAL_3D)


class Autoencoder(nn.Module):
    """A diffusers KL autoencoder (`.vae`) with stored latent scale and shift buffers."""

    def __init__(self, vae: nn.Module, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        name = type(vae).__name__
        if name not in SUPPORTED:
            raise ValueError(f"model.autoencoder: {name} is not one of {', '.join(SUPPORTED)}")
        self.vae = vae
        self.causal_3d = name in CAUSAL_3D
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))
        # Per-channel statistics a video autoencoder carries (diffusers' Wan and LTX-Video
        # pipelines apply them as (latent - mean) / std): part of the "raw" latents here, before
        # the scalar shift and scale (`_statistics`). Wan's are in its config; identity when absent.
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        per_channel = mean is not None and std is not None
        self.register_buffer("channel_mean", torch.tensor(mean if per_channel else [0.0]).float(), persistent=False)
        self.register_buffer("channel_std", torch.tensor(std if per_channel else [1.0]).float(), persistent=False)
        self.downsample_factor = _spatial_factor(vae)
        self.temporal_downsample = _temporal_factor(vae) if self.causal_3d else 1
        self.latent_channels = _latent_channels(vae)

    # -- encode / decode -----------------------------------------------------------------------

    def encode_raw(self, x: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latents before the scalar shift and scale: the posterior mode (or a sample), with the
        autoencoder's own per-channel statistics applied. x (B, C, H, W) / (B, C, F, H, W)."""
        latent = self._run(lambda v: self._per_frame(v, lambda f: _posterior(self.vae, f, sample, generator)), x)
        mean, std = self._statistics()  # latent: (B, c, [F',] h, w)
        return (latent - self._channels(mean, latent)) / self._channels(std, latent)

    def _statistics(self) -> tuple[Tensor, Tensor]:
        """The per-channel (mean, std) of the raw latents, (c,) or (1,): LTX-Video keeps them as
        buffers loaded with its weights (its config has none: they were left at 0 and 1),
        others in their config (`channel_mean`, `channel_std`)."""
        mean, std = self.vae._buffers.get("latents_mean"), self.vae._buffers.get("latents_std")
        if mean is not None and std is not None:
            return mean.float(), std.float()
        return self.channel_mean, self.channel_std

    @staticmethod
    def _channels(v: Tensor, like: Tensor) -> Tensor:
        """(c,) or (1,) statistics shaped to broadcast over (B, c, [F,] h, w)."""
        return v.to(like.dtype).view(1, -1, *([1] * (like.ndim - 2)))

    def encode(self, x: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """x in [-1, 1] -> z = (latent - shift) * scale, (B, c, [F',] H/f, W/f)."""
        return (self.encode_raw(x, sample, generator) - self.shift) * self.scale

    def decode(self, z: Tensor) -> Tensor:
        """z (B, c, [F',] h, w) -> x (B, C, [F,] h f, w f)."""
        mean, std = self._statistics()
        latent = (z / self.scale + self.shift) * self._channels(std, z) + self._channels(mean, z)
        return self._run(lambda v: self._per_frame(v, self._decode_raw), latent)

    @property
    def force_upcast(self) -> bool:
        """Whether the VAE overflows float16: diffusers' `force_upcast` (true by default for
        AutoencoderKL; SD's and SDXL's VAEs reach inf activations in fp16, hence NaN latents
        and black images, and diffusers' pipelines upcast them to float32 for fp16 runs)."""
        return bool(self.vae.config.get("force_upcast", False))

    def weights_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of this frozen VAE's weights in a run computing in `dtype`: float32 for
        float16 where the VAE asks for it (`force_upcast`)."""
        return torch.float32 if dtype == torch.float16 and self.force_upcast else dtype

    def _run(self, fn, x: Tensor) -> Tensor:
        """`fn(x)` through the VAE; a float32 VAE that asks to be upcast runs with a float16
        autocast off (which would run its convolutions in fp16 over the fp32 weights)."""
        device = x.device.type
        fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        if not (fp16 and self.force_upcast and self.vae.dtype == torch.float32):
            return fn(x)
        with torch.autocast(device, enabled=False):
            return fn(x.float())

    def _decode_raw(self, latent: Tensor) -> Tensor:
        """The VAE's decoder; one conditioned on a decode timestep (LTX-Video from 0.9.1,
        `timestep_conditioning`) at diffusers' LTXPipeline default, 0, with no noise added (it
        failed without one)."""
        if self.vae.config.get("timestep_conditioning"):
            return self.vae.decode(latent, temb=latent.new_zeros(latent.shape[0])).sample
        return self.vae.decode(latent).sample

    def _per_frame(self, x: Tensor, fn) -> Tensor:
        """Apply an image function to images, and to videos frame by frame (2-D VAE) or whole
        (causal 3-D VAE, which sees an image as a 1-frame video)."""
        if self.causal_3d:
            return fn(x) if x.ndim == 5 else fn(x.unsqueeze(2)).squeeze(2)
        if x.ndim == 4:
            return fn(x)  # (B, C', H', W')
        B, C, Fr, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * Fr, C, H, W)  # (B F, C, H, W)
        out = fn(frames)  # (B F, C', H', W')
        return out.view(B, Fr, *out.shape[1:]).transpose(1, 2)  # (B, C', F, H', W')

    # -- latent statistics ---------------------------------------------------------------------

    @torch.no_grad()
    def fit_scale(self, batches: Union[Tensor, Iterable[Tensor]], encoded: bool = False) -> tuple[float, float]:
        """Set shift = mean and scale = 1 / std of the raw latents over all elements (SD's
        scaling_factor, SD3's shift_factor). `batches`: pixel images/videos, or raw latents from
        `encode_raw` when encoded=True. Returns (scale, shift)."""
        count, total, total_sq = 0, 0.0, 0.0
        for batch in [batches] if isinstance(batches, Tensor) else batches:
            latents = (batch if encoded else self.encode_raw(batch)).double()
            count += latents.numel()
            total += latents.sum().item()
            total_sq += latents.square().sum().item()
        if count < 2:
            raise ValueError("fit_scale needs at least two latent values")
        mean = total / count
        std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
        self.scale.fill_(1.0 / std)
        self.shift.fill_(mean)
        return 1.0 / std, mean

    # -- storage -------------------------------------------------------------------------------

    def save(self, directory: Union[str, Path]) -> None:
        """diffusers folder (safetensors + config.json) and latent_norm.json; no pickle. Written
        beside `directory` and renamed over it, replacing it whole: rewritten in place, a kill
        between the weights and latent_norm.json left new weights beside the old scale."""
        directory = Path(directory)
        tmp = temporary_dir(directory)
        if "scaling_factor" in self.vae.config:
            self.vae.register_to_config(scaling_factor=float(self.scale), shift_factor=float(self.shift))
        self.vae.save_pretrained(str(tmp), safe_serialization=True)
        norm = {"scale": float(self.scale), "shift": float(self.shift), "class": type(self.vae).__name__}
        (tmp / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n")
        replace_dir(tmp, directory)

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Autoencoder":
        """A folder written by `save`, or any diffusers folder of a supported autoencoder."""
        directory = Path(directory)
        vae = diffusers_class(directory)[0].from_pretrained(str(directory))
        norm_file = directory / NORM_FILE
        if norm_file.is_file():
            norm = json.loads(norm_file.read_text())
            scale, shift = norm["scale"], norm["shift"]
        else:
            scale = vae.config.get("scaling_factor", 1.0) or 1.0
            shift = vae.config.get("shift_factor", 0.0) or 0.0
        return cls(vae, scale, shift)


def diffusers_class(directory: Union[str, Path]) -> tuple[type, dict]:
    """(diffusers class, config dict) of an autoencoder folder, from its config.json alone."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.autoencoder.path: no diffusers config.json in {directory}")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name", "")
    if name not in SUPPORTED:
        raise ValueError(f"model.autoencoder.path: {name or 'unknown class'} is not one of {', '.join(SUPPORTED)}")
    import diffusers

    return getattr(diffusers, name), config


class PixelSpace(nn.Module):
    """kind=none: the identity 'autoencoder' of a pixel-space DiT (same interface, no `.vae`)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.vae = None
        self.causal_3d = False
        self.downsample_factor = 1
        self.temporal_downsample = 1
        self.latent_channels = channels

    def encode(self, x: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def fit_scale(self, batches: Union[Tensor, Iterable[Tensor]], encoded: bool = False) -> tuple[float, float]:
        return 1.0, 0.0


def _posterior(vae: nn.Module, x: Tensor, sample: bool, generator: Optional[torch.Generator]) -> Tensor:
    dist = vae.encode(x).latent_dist
    return dist.sample(generator) if sample else dist.mode()


def _compression(vae: nn.Module, names: tuple[str, ...]) -> Optional[int]:
    """The first of `names` found as an attribute or config entry of the diffusers VAE."""
    for name in names:
        value = vars(vae).get(name) or vae.config.get(name)
        if value:
            return int(value)
    return None


def _spatial_factor(vae: nn.Module) -> int:
    found = _compression(vae, ("spatial_compression_ratio", "scale_factor_spatial"))
    return found or 2 ** (len(vae.config.block_out_channels) - 1)


def _temporal_factor(vae: nn.Module) -> int:
    found = _compression(vae, ("temporal_compression_ratio", "scale_factor_temporal"))
    return found or 2 ** sum(bool(d) for d in vae.config.get("temperal_downsample", []))


def _latent_channels(vae: nn.Module) -> int:
    config = vae.config
    return int(config.get("latent_channels") or config.get("z_dim"))


def build_kl(cfg: AutoencoderConfig):
    """A fresh 2-D diffusers AutoencoderKL of cfg's size (for the autoencoder stage)."""
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=math.gcd(32, *cfg.block_out_channels),
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_attention,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_causal_3d(cfg: AutoencoderConfig):
    """A fresh causal 3-D AutoencoderKLWan of cfg's size; every level halves time and space."""
    from diffusers import AutoencoderKLWan

    if not cfg.mid_attention:
        raise ValueError("model.autoencoder.mid_attention: false applies to the 2-D kl autoencoder only; "
                         "the causal 3-D one always has it")
    base = cfg.block_out_channels[0]
    if any(c % base for c in cfg.block_out_channels):
        raise ValueError("model.autoencoder.block_out_channels: each must be a multiple of the first")
    levels = len(cfg.block_out_channels)
    return AutoencoderKLWan(
        base_dim=base,
        z_dim=cfg.latent_channels,
        dim_mult=[c // base for c in cfg.block_out_channels],
        num_res_blocks=cfg.layers_per_block,
        temperal_downsample=[True] * (levels - 1),
        latents_mean=[0.0] * cfg.latent_channels,
        latents_std=[1.0] * cfg.latent_channels,
        scale_factor_spatial=2 ** (levels - 1),
        scale_factor_temporal=2 ** (levels - 1),
    )


def build_autoencoder(cfg: AutoencoderConfig, causal_3d: bool = False) -> Union[Autoencoder, PixelSpace]:
    """kind=none: `PixelSpace`. kind=kl: `Autoencoder.load(cfg.path)` when a path is given,
    else a fresh AutoencoderKL of cfg's size (scale 1, shift 0 until `fit_scale`);
    causal_3d=True builds a causal 3-D video autoencoder instead (AutoencoderKLWan)."""
    if cfg.kind == "none":
        return PixelSpace()
    if cfg.kind != "kl":
        raise ValueError(f"model.autoencoder.kind: '{cfg.kind}' is not one of none, kl")
    if cfg.path:
        return Autoencoder.load(cfg.path)
    return Autoencoder(build_causal_3d(cfg) if causal_3d else build_kl(cfg))


__all__ = ["Autoencoder", "PixelSpace", "build_autoencoder"]
