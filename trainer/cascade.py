"""Cascaded inference: text -> base model -> each super-resolution stage -> decode -> pixels.

A cascade is a small YAML listing its stages' checkpoints, the base model first; each stage may
set its own sampler settings (unset ones take the command line's) and the super-resolution
stages their noise-conditioning augmentation level at inference (Ho et al. 2021, "Cascaded
Diffusion Models", sec. 4.2; unset: the checkpoint's `stage.noise_aug_sample`):

    stages:
      - checkpoint: runs/base/checkpoints          # a checkpoint root (uses `latest`) or step dir
      - checkpoint: runs/sr64/checkpoints
        steps: 20
        cfg: 1.5
        noise_aug: 0.1
        overrides: [model.autoencoder.path=/data/ae]   # dotted overrides of its run config

Relative paths are resolved against the YAML's folder. A single checkpoint is a one-stage
cascade. Each stage is rebuilt from its checkpoint's resolved config with `build_stage`, so it
samples with exactly the schedule, text encoder, autoencoder and shapes it was trained with.
Between stages the image goes through pixels: decoded by one stage's autoencoder, resized to
the next stage's low-resolution size and encoded by its autoencoder (pixel models: identity).

Every stage lives on one device (`device=`, the CLI's `--device`): networks, text encoders and
autoencoders are moved there and every tensor of a sampling call is made there; noise is drawn
with the caller's CPU generator and moved (trainer.diffusion.randn), so a seed gives the same
samples on any device. `sample_batched` brings each chunk back to the host for saving/judging.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer.bundle import InferenceBundle, student_settings
from trainer.checkpoint_format import (COMPLETE, EMA_FILE, LATEST, CheckpointError, load_for_inference, resolve,
                                       verify)
from trainer.config import ConfigError, RunConfig, load_config
from trainer.diffusion import SAMPLERS, SamplerSettings
from trainer.media import save_image_grid, save_mp4, save_video_grid, to_uint8
from trainer.stage_config import distilled_steps

DISTILLED = ("progressive", "adversarial")  # student checkpoints of the distillation stages
RAW_PREFIX = "fp32/"  # the fp32 master weights in a universal file (trainer/elastic.py)


@dataclass
class CascadeStageSpec:
    checkpoint: str
    steps: Optional[int] = None
    cfg: Optional[float] = None
    guidance_rescale: Optional[float] = None
    sampler: Optional[str] = None
    noise_aug: Optional[float] = None  # super-resolution stages only
    overrides: list[str] = field(default_factory=list)


@dataclass
class CascadeSpec:
    stages: list[CascadeStageSpec] = field(default_factory=list)


def resolve_checkpoint(directory: str | Path) -> Path:
    """A step directory: `directory` itself, or the one its `latest` pointer names."""
    directory = resolve(directory)
    if not (directory / COMPLETE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {COMPLETE}); pass a "
                                f"checkpoint root holding `{LATEST}` or a step_* directory")
    return directory


def load_cascade_spec(path: str | Path) -> CascadeSpec:
    """A cascade YAML (typed; unknown keys fail naming the key), or a checkpoint directory as a
    one-stage cascade."""
    path = Path(path)
    if path.is_dir():
        return CascadeSpec([CascadeStageSpec(str(path))])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a cascade YAML")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CascadeSpec), OmegaConf.load(path))
        spec: CascadeSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}:{getattr(e, 'full_key', '?')}", str(e).splitlines()[0]) from None
    if not spec.stages:
        raise ConfigError(f"{path}:stages", "a cascade lists at least one stage (the base model)")
    for stage in spec.stages:
        stage.checkpoint = str((path.parent / stage.checkpoint).resolve())
    return spec


def raw_weights(directory: Path) -> dict[str, Tensor]:
    """The student's non-EMA weights: the fp32 master weights of the checkpoint's universal
    file (trainer/elastic.py), whole and by the network's weight names for every layout. Not
    DeepSpeed's module file: it holds flat block parameters under `model.flat_params`, ZeRO-3
    partitions, nothing under pipeline parallelism, and half-precision weights under bf16/fp16.
    Checked against COMPLETE.json; safetensors only (no pickle runs)."""
    from safetensors import safe_open

    from trainer.elastic import universal_file

    name = universal_file("student")
    if not (directory / name).is_file():
        raise CheckpointError(f"{directory} holds no {name} (it was written with checkpoint.universal=false, or it "
                              f"is a round export), so its raw weights are not stored whole: sample or export its "
                              f"EMA weights (drop --raw), or train with checkpoint.universal=true (the default)")
    verify(directory, (name,))
    with safe_open(str(directory / name), framework="pt") as f:  # only the weights, not Adam's moments
        return {key.removeprefix(RAW_PREFIX): f.get_tensor(key) for key in f.keys() if key.startswith(RAW_PREFIX)}


@dataclass
class LoadedStage:
    """One cascade stage ready to sample: the inference bundle of its run (schedule, text
    encoder, autoencoder, shapes) and a plain network carrying the checkpoint's weights."""

    cfg: RunConfig
    stage: InferenceBundle
    net: nn.Module
    settings: SamplerSettings
    checkpoint: Path
    distilled: bool = False  # a progressive/adversarial student: no CFG, guidance as an input
    weights: str = "ema"  # which weights `net` carries: ema, or raw (asked for, or no EMA was kept)

    @property
    def superres(self) -> bool:
        return self.cfg.model.superres

    @property
    def pixel_resolution(self) -> int:
        return self.cfg.data.sr_resolution if self.superres else self.cfg.data.resolution


def load_stage(spec: CascadeStageSpec, defaults: SamplerSettings, ema: bool = True,
               device: torch.device | str = "cpu") -> LoadedStage:
    """The inference bundle of a checkpoint's config and its network with the EMA (or raw)
    weights, both on `device` in float32; no training stage (student, teacher) is built."""
    directory = resolve_checkpoint(spec.checkpoint)
    if ema and not (directory / EMA_FILE).is_file():
        print(f"{directory} holds no EMA weights (ema.enabled=false): sampling its raw weights", flush=True)
        ema = False
    weights = load_for_inference(directory)[1] if ema else raw_weights(directory)
    cfg = load_config(directory / "config.yaml", list(spec.overrides))
    if spec.noise_aug is not None:
        cfg.stage.noise_aug_sample = spec.noise_aug
    if cfg.stage.kind not in ("pretrain", "superres", *DISTILLED):
        raise ValueError(f"{directory} is a '{cfg.stage.kind}' checkpoint; a cascade stage is a pretrain, "
                         f"superres or distilled ({', '.join(DISTILLED)}) checkpoint")
    settings = replace(defaults, **{k: v for k, v in (("steps", spec.steps), ("cfg_scale", spec.cfg),
                                                      ("guidance_rescale", spec.guidance_rescale),
                                                      ("sampler", spec.sampler)) if v is not None})
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"sampler '{settings.sampler}' is not one of {', '.join(SAMPLERS)}")
    distilled = cfg.stage.kind in DISTILLED
    if distilled:
        settings = distilled_settings(cfg, settings, directory)
    bundle = InferenceBundle(cfg.model, cfg.diffusion, cfg.data)
    net = bundle.network(weights)  # built on the host, then moved (in place) with the bundle
    bundle.nets.append(net)
    bundle.to(torch.device(device))
    return LoadedStage(cfg, bundle, net, settings, directory, distilled, "ema" if ema else "raw")


def distilled_settings(cfg: RunConfig, settings: SamplerSettings, directory: Path) -> SamplerSettings:
    """What a distilled student samples with, as samples.json records it: the step count it was
    distilled for unless another one was asked for (a step count equal to the default counts as
    not asked for), and `student_settings` (DDIM, no CFG); a sampler or guidance rescale asked
    for (other than the default) is noted as not applying."""
    steps = distilled_steps(cfg.stage)
    if settings.steps == SamplerSettings().steps and steps is not None:
        print(f"{directory} is a {cfg.stage.kind} student: sampling it with its {steps} steps", flush=True)
        settings = replace(settings, steps=steps)
    used = student_settings(settings, cfg.model.guidance_embed)
    unused = [f"{what} {asked}" for what, asked, default, now in (
        ("sampler", settings.sampler, SamplerSettings().sampler, used.sampler),
        ("guidance rescale", settings.guidance_rescale, SamplerSettings().guidance_rescale, used.guidance_rescale))
        if asked != default and asked != now]
    if unused:
        print(f"{directory} is a {cfg.stage.kind} student: it samples with {used.sampler} and no CFG, so the "
              f"{' and '.join(unused)} asked for do not apply", flush=True)
    return used


def resize_pixels(pixels: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Images (B, 3, H, W) or videos (B, 3, F, H, W) resized to `size` (a side, or (height,
    width)) by area averaging down, bilinear up; frames kept."""
    h, w = (size, size) if isinstance(size, int) else size
    if pixels.shape[-2:] == (h, w):
        return pixels
    frames = pixels.movedim(2, 1).flatten(0, 1) if pixels.ndim == 5 else pixels  # (B F, 3, H, W)
    mode = "area" if h * w < pixels.shape[-2] * pixels.shape[-1] else "bilinear"
    out = F.interpolate(frames, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out.view(pixels.shape[0], pixels.shape[2], 3, h, w).movedim(1, 2) if pixels.ndim == 5 else out


@dataclass(frozen=True)
class SampleSize:
    """What `dit sample --height --width --frames` asks of a cascade: the base stage's output in
    pixels (None: its configured square) and frame count (None: data.num_frames). A later
    (super-resolution) stage keeps the aspect: it samples at the base size times its
    sr_resolution / the base's resolution, from a low-resolution input at the base size times
    its data.resolution / the base's resolution."""

    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None

    def scaled(self, side: int, base_side: int) -> tuple[Optional[int], Optional[int]]:
        """(height, width) at `side` for a base stage of `base_side` (None where not asked)."""
        return tuple(None if v is None else round(v * side / base_side) for v in (self.height, self.width))


class Cascade:
    """Stages loaded from a `CascadeSpec`; `sample(prompts, generator)` -> pixels in [-1, 1]."""

    def __init__(self, stages: Sequence[LoadedStage]):
        if not stages:
            raise ValueError("a cascade needs at least the base model")
        if stages[0].superres:
            raise ValueError(f"the first stage ({stages[0].checkpoint}) is a super-resolution model; "
                             f"list the base model first")
        for s in stages[1:]:
            if not s.superres:
                raise ValueError(f"{s.checkpoint} follows the base model but is not a super-resolution model")
        self.stages = list(stages)

    @classmethod
    def load(cls, recipe: str | Path, defaults: SamplerSettings, ema: bool = True,
             device: torch.device | str = "cpu") -> "Cascade":
        """The stages of `recipe`, all on `device`."""
        spec = load_cascade_spec(recipe)
        return cls([load_stage(s, defaults, ema, device) for s in tqdm(spec.stages, desc="loading stages", leave=False)])

    @property
    def device(self) -> torch.device:
        """Where the stages run (the base model's device; `load` puts all stages on one)."""
        return self.stages[0].stage.device

    @property
    def resolution(self) -> int:
        return self.stages[-1].pixel_resolution

    @property
    def fps(self) -> float:
        """The frame rate of the clips its last stage learned from (data.fps), the rate its
        videos are saved at; 0 where clips were taken by frame stride (no one rate)."""
        return self.stages[-1].cfg.data.fps

    @torch.no_grad()
    def run_stage(self, s: LoadedStage, prompts: Sequence[str], generator: torch.Generator,
                  previous: Optional[Tensor], size: SampleSize = SampleSize()) -> Tensor:
        """Pixels of one stage; `previous`: the pixels of the stage before (super-resolution)."""
        base = self.stages[0].pixel_resolution
        height, width = size.scaled(s.pixel_resolution, base)
        frames = size.frames if s is self.stages[0] else None  # later stages: their own clip length
        shape = s.stage.sample_shape(height, width, frames)
        extras = None
        if previous is not None:
            low_h, low_w = size.scaled(s.cfg.data.resolution, base)
            side = s.cfg.data.resolution
            lowres = s.stage.autoencoder.encode(resize_pixels(previous, (low_h or side, low_w or side)))
            extras = s.stage.upsample_extras(lowres, s.cfg.stage.noise_aug_sample, generator)  # noise-augmented
        return s.stage.sample_pixels(s.net, prompts, s.settings, generator, extras, shape, s.distilled)

    def sample(self, prompts: Sequence[str], generator: torch.Generator, size: SampleSize = SampleSize()) -> Tensor:
        """(N, 3, H, W) images or (N, 3, F, H, W) videos in [-1, 1] at the last stage's size (or
        `size` scaled to it), on the cascade's device."""
        pixels: Optional[Tensor] = None
        for s in self.stages:
            pixels = self.run_stage(s, prompts, generator, pixels, size)
        assert pixels is not None
        return pixels

    def sample_batched(self, prompts: Sequence[str], generator: torch.Generator, batch_size: int = 16,
                       progress: bool = True, size: SampleSize = SampleSize()) -> Tensor:
        """`sample` over chunks of `batch_size` prompts (one generator: reproducible per seed),
        each chunk brought back to the host (the device holds one chunk at a time)."""
        chunks = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]
        bar = tqdm(chunks, desc="sampling", unit="batch", disable=not progress or len(chunks) < 2)
        return torch.cat([self.sample(c, generator, size).cpu() for c in bar])


def save_sample(sample: Tensor, stem: Path, fps: float = 0.0) -> Path:
    """One image (3, H, W) as `stem`.png or video (3, F, H, W) as `stem`.mp4 at `fps` (0: the
    media default), from [-1, 1]."""
    if sample.ndim == 4:
        return save_mp4(sample, stem.with_suffix(".mp4"), fps)
    Image.fromarray(to_uint8(sample)).save(stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def save_samples(pixels: Tensor, prompts: Sequence[str], out_dir: str | Path,
                 meta: Optional[dict] = None, fps: float = 0.0) -> dict[str, object]:
    """One PNG per image (MP4 per video, at `fps`) plus a grid with the prompts (PNG; animated
    GIF for videos) and `samples.json` listing files, prompts and `meta`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [save_sample(sample, out / f"{i:05d}", fps).name for i, sample in enumerate(pixels)]
    if pixels.ndim == 5:
        grid = save_video_grid(pixels, prompts, out / "grid.gif", fps)
    else:
        grid = save_image_grid(pixels, prompts, out / "grid.png")
    record = {"files": files, "prompts": list(prompts), "grid": grid.name, **(meta or {})}
    (out / "samples.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
