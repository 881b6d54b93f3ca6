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
        overrides: [model.autoencoder.path=/data/ae]   # where its encoders now live

Relative paths are resolved against the YAML's folder. A stage's `overrides` relocate the
weights its run config points at, `model.text.path` and `model.autoencoder.path` only
(`STAGE_OVERRIDES`): a checkpoint is sampled as the network, schedule and data it was trained
with, and the sampler settings have their own fields (steps, cfg, guidance_rescale, sampler,
noise_aug). A single checkpoint is a one-stage cascade. Each stage is rebuilt from its
checkpoint's resolved config with `build_stage`, so it samples with exactly the schedule, text
encoder, autoencoder and shapes it was trained with.
Between stages the image goes through pixels: decoded by one stage's autoencoder, resized to
the next stage's low-resolution size and encoded by its autoencoder (pixel models: identity).

Every stage lives on one device (`device=`, the CLI's `--device`): networks, text encoders and
autoencoders are moved there and every tensor of a sampling call is made there.
Each stage samples in a `precision` (the CLI's `--precision`): fp32, or bf16/fp16 autocast as
training runs its forward passes (`trainer.numerics.autocast`); `auto` (the default) is the
precision the stage was trained in on an accelerator and fp32 on the CPU (whose bf16 matmuls
are slower than its fp32 ones). The weights stay float32 either way, but for the text encoder's,
in its own `model.text.precision`.

Noise is per prompt (`PromptSeeds`): prompt i of a list draws all its noise at stage k (the
noise augmentation of its low-resolution input, its initial noise, DDPM's step noise) from its
own generator seeded by (seed, k, i), the per-sample streams of training (trainer.diffusion.noise),
so its sample does not depend on the batch size or on the prompts beside it. The generators live
where the caller's seed generator does: on the CPU (the commands) they draw on the host and the
noise is moved (trainer.diffusion.randn), so a seed gives the same samples on any device; on a
CUDA generator the draws stay on the GPU. `sample_batched` brings each chunk back to the host for
saving/judging.
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
from trainer.checkpoint_format import (COMPLETE, EMA_FILE, LATEST, ROUND_FILE, CheckpointError, load_for_inference,
                                       resolve, student_round, verify)
from trainer.codes import SAMPLING_PRECISIONS
from trainer.config import ConfigError, DataConfig, RunConfig, load_config
from trainer.diffusion import SAMPLERS, SamplerSettings
from trainer.diffusion.noise import sample_generators
from trainer.diffusion.utils import Generators
from trainer.encoder_record import check_encoders
from trainer.media import save_image_grid, save_mp4, save_video_grid, to_uint8
from trainer.numerics import autocast
from trainer.stage_config import distilled_steps, listing

DISTILLED = ("progressive", "adversarial")  # student checkpoints of the distillation stages
RAW_PREFIX = "fp32/"  # the fp32 master weights in a universal file (trainer/elastic.py)
STAGE_OVERRIDES = ("model.text.path", "model.autoencoder.path")  # the keys a stage's `overrides` may set


@dataclass
class CascadeStageSpec:
    checkpoint: str
    steps: Optional[int] = None
    cfg: Optional[float] = None
    guidance_rescale: Optional[float] = None
    sampler: Optional[str] = None
    noise_aug: Optional[float] = None  # super-resolution stages only
    overrides: list[str] = field(default_factory=list)  # key=value of STAGE_OVERRIDES: where its weights live


@dataclass
class CascadeSpec:
    stages: list[CascadeStageSpec] = field(default_factory=list)


def resolve_checkpoint(directory: str | Path) -> Path:
    """A step directory: `directory` itself, or the one its `latest` pointer names."""
    directory = resolve(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist; pass a checkpoint root holding `{LATEST}` or a "
                                f"step_* directory")
    if not (directory / COMPLETE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {COMPLETE}); pass a "
                                f"checkpoint root holding `{LATEST}` or a step_* directory")
    return directory


def load_cascade_spec(path: str | Path) -> CascadeSpec:
    """A cascade YAML (typed; unknown keys fail naming the key, as do overrides of keys other
    than STAGE_OVERRIDES: `check_overrides`), or a checkpoint directory as a one-stage cascade."""
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
    for i, stage in enumerate(spec.stages):
        check_overrides(stage.overrides, f"{path}:stages[{i}].overrides")
        stage.checkpoint = str((path.parent / stage.checkpoint).resolve())
    return spec


def check_overrides(overrides: Sequence[str], key: str) -> None:
    """ConfigError at `key` for an override that is not `key=value` of STAGE_OVERRIDES, before
    any stage is loaded: another setting changed the checkpoint it samples (a v-prediction
    network sampled as an x0 one, silently)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(key, f"'{item}' is not key=value, e.g. model.autoencoder.path=/data/ae")
        name = item.split("=", 1)[0].strip()
        if name not in STAGE_OVERRIDES:
            raise ConfigError(key, f"'{name}' cannot be overridden: a checkpoint is sampled as the network, schedule "
                                   f"and data it was trained with; overrides relocate its weights "
                                   f"({', '.join(STAGE_OVERRIDES)}), and the sampler settings have their own "
                                   f"fields (steps, cfg, guidance_rescale, sampler, noise_aug)")


def raw_weights(directory: Path) -> dict[str, Tensor]:
    """The student's non-EMA weights: the fp32 master weights of the checkpoint's universal
    file (trainer/elastic.py), whole and by the network's weight names for every layout. Not
    DeepSpeed's module file: it holds flat block parameters under `model.flat_params`, ZeRO-3
    partitions, nothing under pipeline parallelism, and half-precision weights under bf16/fp16.
    The file and the config.yaml it is sampled with are checked against COMPLETE.json, as
    `load_for_inference` checks the EMA's; safetensors only (no pickle runs)."""
    from safetensors import safe_open

    from trainer.elastic import universal_file

    name = universal_file("student")
    if not (directory / name).is_file():
        raise CheckpointError(f"{directory} holds no {name} (it was written with checkpoint.universal=false, or it "
                              f"is a round export), so its raw weights are not stored whole: sample or export its "
                              f"EMA weights (drop --raw), or train with checkpoint.universal=true (the default)")
    verify(directory, ("config.yaml", name))
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
    precision: str = "fp32"  # the autocast its sampling runs under: fp32 | bf16 | fp16 (`sampling_precision`)

    @property
    def superres(self) -> bool:
        return self.cfg.model.superres

    @property
    def pixel_resolution(self) -> int:
        return self.cfg.data.sr_resolution if self.superres else self.cfg.data.resolution


def sampling_precision(asked: str, trained: str, device: torch.device) -> str:
    """The precision a stage samples in: `asked`, or for `auto` the one it was trained in
    (deepspeed.precision) on an accelerator and fp32 on the CPU."""
    if asked not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision '{asked}' is not one of {', '.join(SAMPLING_PRECISIONS)}")
    if asked != "auto":
        return asked
    return "fp32" if device.type == "cpu" else trained


def stage_overrides(spec: CascadeStageSpec) -> list[str]:
    """The overrides a stage's config.yaml is loaded with: the spec's own (of STAGE_OVERRIDES,
    checked by `load_cascade_spec`), and its `noise_aug` as `stage.noise_aug_sample`, so that it
    is validated as that setting is (a super-resolution stage's, within the [0, noise_aug_max]
    it trained at)."""
    overrides = list(spec.overrides)
    if spec.noise_aug is not None:
        overrides.append(f"stage.noise_aug_sample={spec.noise_aug}")
    return overrides


def load_stage(spec: CascadeStageSpec, defaults: SamplerSettings, ema: bool = True,
               device: torch.device | str = "cpu", steps: Optional[int] = None,
               precision: str = "auto") -> LoadedStage:
    """The inference bundle of a checkpoint's config and its network with the EMA (or raw)
    weights, both on `device` in float32 (the text encoder in model.text.precision), to sample
    in `precision` (`sampling_precision`); no training stage (student, teacher) is built.

    Step count: the stage's own `steps`, else `steps` (the command line's --steps), else a
    distilled student's own count (`distilled_settings`), else `defaults.steps`. None means
    "not asked for": a count equal to the default, asked for, is still a request."""
    directory = resolve_checkpoint(spec.checkpoint)
    if ema and not (directory / EMA_FILE).is_file():
        print(f"{directory} holds no EMA weights (ema.enabled=false): sampling its raw weights", flush=True)
        ema = False
    weights = load_for_inference(directory)[1] if ema else raw_weights(directory)
    cfg = load_config(directory / "config.yaml", stage_overrides(spec), trained=True)
    check_encoders(directory, cfg.model, "sampling it")
    if cfg.stage.kind not in ("pretrain", "superres", *DISTILLED):
        raise ValueError(f"{directory} is a '{cfg.stage.kind}' checkpoint; a cascade stage is a pretrain, "
                         f"superres or distilled ({', '.join(DISTILLED)}) checkpoint")
    asked_steps = spec.steps if spec.steps is not None else steps  # None: not asked for
    settings = replace(defaults, **{k: v for k, v in (("steps", asked_steps), ("cfg_scale", spec.cfg),
                                                      ("guidance_rescale", spec.guidance_rescale),
                                                      ("sampler", spec.sampler)) if v is not None})
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"sampler '{settings.sampler}' is not one of {', '.join(SAMPLERS)}")
    if not 1 <= settings.steps <= cfg.diffusion.num_timesteps:
        raise ValueError(f"{settings.steps} sampling steps: {directory} samples with 1 to "
                         f"diffusion.num_timesteps={cfg.diffusion.num_timesteps} steps")
    distilled = cfg.stage.kind in DISTILLED
    if distilled:
        settings = distilled_settings(cfg, settings, directory, asked_steps)
    bundle = InferenceBundle(cfg.model, cfg.diffusion, cfg.data)
    net = bundle.network(weights)  # built on the host, then moved (in place) with the bundle
    bundle.nets.append(net)
    bundle.to(torch.device(device))
    return LoadedStage(cfg, bundle, net, settings, directory, distilled, weights_label(directory, ema),
                       sampling_precision(precision, cfg.deepspeed.precision, torch.device(device)))


def weights_label(directory: Path, ema: bool) -> str:
    """"ema" or "raw": the weights sampled from `directory`. A progressive round export keeps its
    student in the EMA file whichever weights they were, and says which in round.json (an
    intermediate round's are the raw ones; one written without the record is taken for EMA, as
    before); a step directory's EMA file holds the EMA."""
    if ema and (directory / ROUND_FILE).is_file():
        return json.loads((directory / ROUND_FILE).read_text()).get("weights", "ema")
    return "ema" if ema else "raw"


def distilled_settings(cfg: RunConfig, settings: SamplerSettings, directory: Path,
                       asked_steps: Optional[int] = None) -> SamplerSettings:
    """What a distilled student samples with, as samples.json records it: `student_settings`
    (DDIM, no CFG) at the step count it was distilled for (a progressive step directory: its
    round's, `student_round`; an adversarial student: the largest of its counts), or at
    `asked_steps` where given (None: not asked for). A student learns to match its teacher at
    the counts it was trained for only (Salimans & Ho 2022, "Progressive Distillation for Fast
    Sampling of Diffusion Models"), so another count is honoured with a warning; the count used
    is printed either way. So is a guidance input outside the w range it was distilled on. A
    sampler, guidance rescale or CFG scale asked for (other than the default) that it does not
    sample with is noted as not applying: the CFG scale of a student without a guidance input
    (model.guidance_embed) changes nothing."""
    own = distilled_steps(cfg.stage, student_round(directory, cfg.stage))
    trained = sorted(set(cfg.stage.rounds)) if cfg.stage.kind == "adversarial" else [own]
    steps = own if asked_steps is None else asked_steps
    student = f"{directory} is a {cfg.stage.kind} student"
    if steps in trained:
        print(f"{student}: sampling it with {steps} steps{'' if asked_steps is None else ', as asked'}", flush=True)
    else:
        print(f"warning: {student} distilled for {' or '.join(map(str, trained))} steps: sampling it with the {steps} "
              f"asked for, which it was not trained for (drop --steps, or the stage's `steps`, to use its {own})",
              flush=True)
    used = student_settings(replace(settings, steps=steps), cfg.model.guidance_embed)
    low, high = cfg.stage.guidance_min, cfg.stage.guidance_max
    if cfg.model.guidance_embed and not low <= used.cfg_scale <= high:
        print(f"warning: {student} learned its guidance input w on [{low:g}, {high:g}] (stage.guidance_min/max): "
              f"sampling it at w={used.cfg_scale:g}, which it was not trained for (--cfg inside that range)",
              flush=True)
    unused = [f"{what} {asked}" for what, asked, default, now in (
        ("sampler", settings.sampler, SamplerSettings().sampler, used.sampler),
        ("guidance rescale", settings.guidance_rescale, SamplerSettings().guidance_rescale, used.guidance_rescale),
        ("CFG scale", settings.cfg_scale, SamplerSettings().cfg_scale, used.cfg_scale))
        if asked != default and asked != now]
    if unused:
        print(f"{student}: it samples with {used.sampler} and no CFG, so the "
              f"{listing(unused)} asked for do not apply", flush=True)
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


@dataclass(frozen=True)
class PromptSeeds:
    """Per-prompt noise of a cascade call: prompt `first + i` of the caller's list draws
    everything of stage k from its own generator, seeded by (seed, k, first + i) with the
    per-sample seeding of training (trainer.diffusion.noise). Each prompt therefore sees the same
    draws whatever batch carries it and whatever prompts sit beside it. The generators live on
    `device`: the CPU gives the same noise for every sampling device (moved there), a CUDA device
    keeps the draws on the GPU."""

    seed: int
    first: int = 0  # the list index of the first prompt of the chunk being sampled
    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, seed: "int | torch.Generator | PromptSeeds") -> "PromptSeeds":
        """From a seed, or a generator standing for the seed it was seeded with (its
        `initial_seed`, on its device; its state is neither read nor advanced)."""
        if isinstance(seed, PromptSeeds):
            return seed
        if isinstance(seed, torch.Generator):
            return cls(seed.initial_seed(), device=seed.device)
        return cls(int(seed))

    def generators(self, stage: int, count: int) -> list[torch.Generator]:
        """One generator per prompt of a `count`-prompt chunk at cascade stage `stage`."""
        return sample_generators(self.seed, stage, range(self.first, self.first + count), self.device)


def clip_timing(data: DataConfig) -> str:
    """How a stage's training clips were taken from their videos, in words."""
    return f"{data.fps:g} fps" if data.fps else f"every {data.frame_stride:g} source frames"


class Cascade:
    """Stages loaded from a `CascadeSpec`; `sample(prompts, noise)` -> pixels in [-1, 1]."""

    def __init__(self, stages: Sequence[LoadedStage]):
        if not stages:
            raise ValueError("a cascade needs at least the base model")
        if stages[0].superres:
            raise ValueError(f"the first stage ({stages[0].checkpoint}) is a super-resolution model; "
                             f"list the base model first")
        for s in stages[1:]:
            if not s.superres:
                raise ValueError(f"{s.checkpoint} follows the base model but is not a super-resolution model")
            if s.cfg.model.video != stages[0].cfg.model.video:
                kinds = {True: "video", False: "image"}
                raise ValueError(f"{s.checkpoint} is a {kinds[s.cfg.model.video]} model after the "
                                 f"{kinds[stages[0].cfg.model.video]} base model; a cascade's stages are all image "
                                 f"or all video models")
            if s.cfg.model.video and clip_timing(s.cfg.data) != clip_timing(stages[0].cfg.data):
                raise ValueError(f"{s.checkpoint} learned from clips at {clip_timing(s.cfg.data)} and the base model "
                                 f"makes them at {clip_timing(stages[0].cfg.data)}: a super-resolution stage keeps "
                                 f"the base's frames, so its clips must move as the base's (data.fps, or "
                                 f"data.frame_stride where data.fps is 0)")
        self.stages = list(stages)

    @classmethod
    def load(cls, recipe: str | Path, defaults: SamplerSettings, ema: bool = True,
             device: torch.device | str = "cpu", steps: Optional[int] = None, precision: str = "auto") -> "Cascade":
        """The stages of `recipe`, all on `device`; `steps`: the step count asked for every stage
        that sets none (None: not asked for; see `load_stage`); `precision`: each stage's
        (`sampling_precision`)."""
        spec = load_cascade_spec(recipe)
        with tqdm(spec.stages, desc="loading stages", leave=False) as bar:  # cleared also when a stage is refused
            return cls([load_stage(s, defaults, ema, device, steps, precision) for s in bar])

    @property
    def device(self) -> torch.device:
        """Where the stages run (the base model's device; `load` puts all stages on one)."""
        return self.stages[0].stage.device

    @property
    def resolution(self) -> int:
        return self.stages[-1].pixel_resolution

    @property
    def fps(self) -> float:
        """The frame rate of the clips its base model learned from (data.fps; the later stages
        keep its frames), the rate its videos are saved at; 0 where clips were taken by frame
        stride (no one rate)."""
        return self.stages[0].cfg.data.fps

    def check_size(self, size: SampleSize) -> None:
        """ValueError naming the stage where `size`, scaled to each stage, is one it cannot take,
        before any stage samples: a DiT input that does not patchify, frames for an image model,
        or a super-resolution stage's low-resolution input that its autoencoder cannot encode
        whole (it floored it, and the smaller latent was stretched over the output: 25% off at
        20 px through a factor of 8)."""
        base, first = self.stages[0].pixel_resolution, self.stages[0].cfg
        frames = size.frames or (first.data.num_frames if first.model.video else None)
        for k, s in enumerate(self.stages):
            try:
                s.stage.sample_shape(*size.scaled(s.pixel_resolution, base), frames)
                factor = s.stage.autoencoder.downsample_factor
                for name, pixels in zip(("height", "width"), size.scaled(s.cfg.data.resolution, base) if k else ()):
                    if pixels is not None and pixels % factor:
                        raise ValueError(f"its low-resolution input's {name}, {pixels} px, is not a multiple of its "
                                         f"autoencoder's downsampling {factor}")
            except ValueError as e:
                raise ValueError(f"stage {k + 1} ({s.checkpoint}): {e}") from None

    @torch.no_grad()
    def run_stage(self, s: LoadedStage, prompts: Sequence[str], generator: Generators,
                  previous: Optional[Tensor], size: SampleSize = SampleSize()) -> Tensor:
        """Pixels of one stage; `previous`: the pixels of the stage before (super-resolution);
        `generator`: one for the batch, or one per prompt (trainer.diffusion.utils.Generators)."""
        base = self.stages[0].pixel_resolution
        height, width = size.scaled(s.pixel_resolution, base)
        # later stages: the clip of the stage before, whatever their own data.num_frames (they
        # upsample space only, as they trained, on low- and high-resolution clips of one length)
        frames = size.frames if previous is None else previous.shape[2] if previous.ndim == 5 else None
        shape = s.stage.sample_shape(height, width, frames)
        extras = None
        with autocast(self.device, s.precision):
            if previous is not None:
                low_h, low_w = size.scaled(s.cfg.data.resolution, base)
                side = s.cfg.data.resolution
                lowres = s.stage.autoencoder.encode(resize_pixels(previous, (low_h or side, low_w or side)))
                extras = s.stage.upsample_extras(lowres, s.cfg.stage.noise_aug_sample, generator)  # noise-augmented
            return s.stage.sample_pixels(s.net, prompts, s.settings, generator, extras, shape, s.distilled).float()

    def sample(self, prompts: Sequence[str], noise: "torch.Generator | PromptSeeds",
               size: SampleSize = SampleSize()) -> Tensor:
        """(N, 3, H, W) images or (N, 3, F, H, W) videos in [-1, 1] at the last stage's size (or
        `size` scaled to it), on the cascade's device. `noise`: `PromptSeeds` (each prompt its
        own noise, as `sample_batched` draws it), or one generator drawing the batch's noise in
        batch order (a sample then depends on its batch: for callers that must start from
        given latents, e.g. trainer.export's check against diffusers)."""
        self.check_size(size)
        pixels: Optional[Tensor] = None
        for k, s in enumerate(self.stages):
            generator = noise.generators(k, len(prompts)) if isinstance(noise, PromptSeeds) else noise
            pixels = self.run_stage(s, prompts, generator, pixels, size)
        assert pixels is not None
        return pixels

    def sample_batched(self, prompts: Sequence[str], seed: "int | torch.Generator | PromptSeeds",
                       batch_size: int = 16, progress: bool = True, size: SampleSize = SampleSize(),
                       finite: bool = True) -> Tensor:
        """`sample` over chunks of `batch_size` prompts with per-prompt noise (`PromptSeeds.of(seed)`):
        prompt i's sample depends on (seed, i) only, not on `batch_size` or its neighbours (up to
        the float rounding of batched matmuls). Each chunk is brought back to the host (the
        device holds one chunk at a time) and, with `finite`, checked there (`check_finite`)."""
        seeds = PromptSeeds.of(seed)
        starts = range(0, len(prompts), batch_size)
        bar = tqdm(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2)
        chunks = []
        for i in bar:
            chunks.append(self.sample(prompts[i: i + batch_size], replace(seeds, first=seeds.first + i), size).cpu())
            if finite:
                check_finite(chunks[-1], self.stages)
        return torch.cat(chunks)


def check_finite(pixels: Tensor, stages: Sequence[LoadedStage]) -> None:
    """Samples (on the host) are finite, or the command stops naming what to change: to_uint8
    would write NaN and -inf as black and +inf as white, and a judge would score them. fp16
    overflows (its largest value is 65504) where bf16 and fp32 do not."""
    if bool(torch.isfinite(pixels).all()):
        return
    where = ", ".join(f"{s.checkpoint} in {s.precision}" for s in stages)
    if all(s.precision == "fp32" for s in stages):
        raise ConfigError("checkpoint", f"sampled non-finite pixels ({where}), from the weights alone (a diverged "
                                        f"run?): sample an earlier checkpoint")
    fix = "bf16 or fp32" if any(s.precision == "fp16" for s in stages) else "fp32"
    raise ConfigError("--precision", f"sampled non-finite pixels ({where}); sample with --precision {fix}")


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
