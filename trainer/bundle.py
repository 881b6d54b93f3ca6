"""What sampling needs of a run, and nothing it does not: the inference bundle.

Built from a run's (model, diffusion, data) sub-configs: the frozen text encoder and
autoencoder, the noise schedule (shifted per sample shape), the prediction type, the DiT's
sample shape, and one `sample_pixels` (generate -> decode -> clamp). Training stages use it for
their preview grids and evaluation; the cascade, `dit eval`, `dit export` and the benchmarks
use it without building a training stage (no student to train, no teacher to load).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from data_pipeline.transforms import TransformSpec
from trainer.config import DataConfig, DiffusionConfig, ModelConfig
from trainer.diffusion import NoiseSchedule, SamplerSettings, add_noise, randn, schedule_for_shape
from trainer.diffusion.schedules import shape_size
from trainer.models.autoencoder import Autoencoder, build_autoencoder
from trainer.models.dit import DiT, build_dit, dit_preset
from trainer.models.text import CachedTextEncoder, TextEncoder, build_text_encoder
from trainer.sampling import generate


def student_settings(settings: SamplerSettings, guidance_input: bool) -> SamplerSettings:
    """What a distilled (progressive/adversarial) student samples with: `settings`' steps, one
    forward per step with the default sampler (DDIM) on the default grid and no CFG, hence no
    guidance rescale; the CFG scale is its guidance input where it takes one
    (model.guidance_embed), else unused (1.0). `dit sample` records these settings."""
    default = SamplerSettings()
    return replace(settings, sampler=default.sampler, spacing=default.spacing, guidance_rescale=0.0,
                   cfg_scale=settings.cfg_scale if guidance_input else 1.0)


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen module on `device` with its parameters in `dtype`, a text encoder in its own
    precision (`TextEncoder.compute_dtype`, model.text.precision: training, precompute and
    sampling see the same embeddings), an autoencoder that overflows float16 in float32
    (`Autoencoder.weights_dtype`); buffers (latent scale and shift, position tables) keep their
    float32 precision."""
    if isinstance(module, TextEncoder):
        dtype = module.compute_dtype
    elif isinstance(module, Autoencoder):
        dtype = module.weights_dtype(dtype)
    module.to(device)
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


class InferenceBundle:
    """Text encoder, autoencoder, schedule, prediction and sample shape of one run's DiT.

    `nets`: networks sampled with the bundle (a cascade stage's loaded DiT), moved by `to`
    together with the frozen helpers."""

    def __init__(self, model: ModelConfig, diffusion: DiffusionConfig, data: DataConfig):
        self.model_cfg, self.diffusion, self.data = model, diffusion, data
        self.prediction = diffusion.prediction
        self.text = CachedTextEncoder(frozen(build_text_encoder(model.text)))
        self.autoencoder = frozen(build_autoencoder(model.autoencoder))  # PixelSpace when kind=none
        self.device = torch.device("cpu")
        self.nets: list[nn.Module] = []
        self._schedules: dict[tuple[float, int], NoiseSchedule] = {}
        if data.kind == "video":  # every clip length the loader can deliver must encode
            for frames in {data.num_frames, *data.frame_buckets}:
                self.latent_frames(frames)
        self._check_buckets()
        self.schedule = self.schedule_for(self.sample_shape())  # at the configured square shape

    def helpers(self) -> list[nn.Module]:
        return [self.text.encoder, self.autoencoder]

    def to(self, device: torch.device | str, helper_dtype: torch.dtype = torch.float32) -> "InferenceBundle":
        """The networks in `nets` to `device`, the frozen helpers there in `helper_dtype` (the
        text encoder in its own precision: `place`)."""
        for net in self.nets:
            net.to(device)
        for module in self.helpers():
            place(module, torch.device(device), helper_dtype)
        return self.moved_to(device)

    def moved_to(self, device: torch.device | str) -> "InferenceBundle":
        """Note that the modules are on `device` now (a training stage moves them with its own);
        the text embeddings cached on the old device and dtype are dropped."""
        self.device = torch.device(device)
        self.text.clear()
        return self

    def network(self, weights: Optional[dict[str, Tensor]]) -> DiT:
        """A plain (unpartitioned) DiT of the run carrying `weights`, in eval mode on the host."""
        net = build_dit(self.model_cfg, self.text.dim, self.text.pooled_dim)
        if weights is not None:
            net.load_state_dict(weights)  # strict: a missing weight is an error, never a default
        return net.eval()

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        """Side of the tensor the DiT sees: pixels, or latents after the autoencoder (the
        high resolution for a super-resolution model)."""
        side = self.data.sr_resolution if self.model_cfg.superres else self.data.resolution
        return side // self.autoencoder.downsample_factor

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

    def _check_buckets(self) -> None:
        """Every (h, w) bucket the loader delivers must patchify: config validation checks it
        where the autoencoder's folder was there to read; one written since is checked here,
        before the first batch of a bad bucket would stop the run."""
        spec = TransformSpec.from_config(self.data)
        for h, w in (spec.sr_sizes if self.model_cfg.superres else None) or spec.sizes:
            try:
                self.sample_shape(h, w)
            except ValueError as e:
                raise ValueError(f"data.bucket_multiple: the loader's {h}x{w} px bucket cannot be patchified: {e} "
                                 f"(set data.bucket_multiple to that multiple, or 0 to derive it)") from None

    def latent_frames(self, frames: int) -> int:
        """Frames the DiT sees for a clip of `frames`: all of them, or 1 + (F - 1) / t after a
        causal 3-D autoencoder that compresses time by t (frame 0 alone, then groups of t); a
        clip's count a whole number of temporal patches (a still: one, held for the patch)."""
        t, patch = self.autoencoder.temporal_downsample, self.model_cfg.temporal_patch
        if (frames - 1) % t:
            raise ValueError(f"{frames} frames: the causal 3-D autoencoder compresses time by {t}, so clips have "
                             f"1 + {t} k frames (data.num_frames, data.frame_buckets, --frames)")
        count = 1 + (frames - 1) // t
        if count > 1 and count % patch:
            raise ValueError(f"{frames} frames are {count} latent frames, not a multiple of the DiT's "
                             f"model.temporal_patch={patch} (--frames)")
        return count

    def schedule_for(self, shape: Sequence[int]) -> NoiseSchedule:
        """The noise schedule of samples shaped `shape` (C, [F,] h, w): its SNR shift follows that
        shape's sqrt(h w) and frame count (`schedule_for_shape`), so each bucket of a batch is
        noised, and each size sampled, with its own shift. Cached per (side, frames)."""
        key = shape_size(shape)
        if key not in self._schedules:
            self._schedules[key] = schedule_for_shape(self.diffusion, shape)
        return self._schedules[key]

    # ---- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        return self.autoencoder.decode(x0)

    def augment(self, lowres: Tensor, level: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Noise-conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models"): the
        low-resolution input x_lo at diffusion time `level` (B,) of the same schedule."""
        alpha, sigma = self.schedule.alpha_sigma(level)  # (B,), (B,)
        return add_noise(lowres, randn(tuple(lowres.shape), generator, lowres.device), alpha, sigma)

    def upsample_extras(self, lowres: Tensor, level: float, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        """The conditioning of one super-resolution call at inference (fixed augmentation level)."""
        levels = torch.full((lowres.shape[0],), level, device=lowres.device)  # (B,)
        return {"lowres": self.augment(lowres, levels, generator), "aug_level": levels}

    @torch.no_grad()
    def sample_pixels(self, net: nn.Module, prompts: Sequence[str], settings: SamplerSettings,
                      generator: torch.Generator, extras: Optional[dict[str, Tensor]] = None,
                      shape: Optional[tuple[int, ...]] = None, distilled: bool = False) -> Tensor:
        """Sample `net` for `prompts` and decode: pixels in [-1, 1] on the network's device, NaN
        where the decode was not finite.

        `extras`: further conditioning (a super-resolution model's low-resolution input);
        `shape`: the DiT input (C, [F,] h, w) (default: the configured square), sampled with the
        schedule shifted for it. `distilled`: a few-step student, one forward per step with no
        CFG (`student_settings`); a guidance-conditioned one gets `settings.cfg_scale` as its
        guidance input."""
        shape = shape or self.sample_shape()
        if distilled:
            extras = dict(extras or {})
            if net.spec.guidance:
                device = next(net.parameters()).device
                extras["guidance"] = torch.full((len(prompts),), float(settings.cfg_scale), device=device)  # (B,)
            settings = student_settings(settings, guidance_input=False)  # the guidance went into `extras`
        x0 = generate(net, self.text, self.schedule_for(shape), self.prediction, prompts, shape, settings,
                      generator, extras)
        nan = float("nan")  # inf (fp16's overflow) as NaN, which the clamp keeps for `to_uint8` to refuse
        return self.decode(x0).nan_to_num(nan=nan, posinf=nan, neginf=nan).clamp(-1, 1)
