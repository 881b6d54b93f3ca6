"""`dit sample CKPT_OR_RECIPE --prompt "..." --out DIR`: text -> base -> super-resolution -> decode.

CKPT_OR_RECIPE is a checkpoint directory (root with `latest`, or a step directory) or a cascade
YAML (see trainer/cascade.py). Writes one PNG per image (MP4 per video), a grid with the prompts
and samples.json. EMA weights unless --raw. Runs on --device (default: the accelerator if
present, else cpu); a seed gives the same samples on every device (in one --precision: by default
the run's on an accelerator, fp32 on the CPU). --height/--width (pixels)
and --frames set the base stage's output shape (default: its configured square and clip
length; super-resolution stages keep the aspect), sampled with the SNR shift of that shape.
Prompt i's sample depends on (--seed, i) only, not on --batch-size or the other prompts
(per-prompt noise: trainer.cascade.PromptSeeds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.codes import (DEFAULT_CFG, DEFAULT_RESCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, EXIT_CONFIG,
                           SAMPLING_PRECISIONS)
from trainer.codes import SAMPLER_NAMES as SAMPLERS
from trainer.config_errors import ConfigError

SETTINGS = {"steps": "steps", "cfg": "cfg_scale", "guidance_rescale": "guidance_rescale", "sampler": "sampler"}
DEVICE_HELP = "where the models run: auto (default: the accelerator if present, else cpu), cpu, cuda, cuda:N"


def parse_device(text: str):
    """The `--device` value as a torch.device. `auto`: the accelerator accelerate detects
    (`accelerate.utils.get_torch_accelerator_backend`; no process group, no CUDA context),
    else cpu. Anything else must be cpu or a device of that accelerator present here."""
    import torch
    from accelerate.utils import get_torch_accelerator_backend

    kind, module = get_torch_accelerator_backend()
    if text == "auto":
        return torch.device(kind or "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != kind:
        raise argparse.ArgumentTypeError(f"'{text}': this machine has no {device.type} device (accelerator found: "
                                         f"{kind or 'none'}); use --device {kind or 'cpu'}")
    if device.index is not None and device.index >= module.device_count():
        raise argparse.ArgumentTypeError(f"'{text}': this machine has {module.device_count()} {kind} device(s), "
                                         f"{kind}:0 to {kind}:{module.device_count() - 1}")
    return device


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of steps, prompts, samples)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a classifier-free guidance scale, at least 0 (0: unconditional, 1: no guidance)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value}: a guidance scale is at least 0 (0: unconditional, 1: none)")
    return value


def rescale_fraction(text: str) -> float:
    """An argparse type: the guidance rescale phi of Lin et al. 2023, a fraction in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: the guidance rescale phi is a fraction in [0, 1]")
    return value


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """`--device`, resolved (and checked) when the command's arguments are parsed."""
    p.add_argument("--device", type=parse_device, default="auto", help=DEVICE_HELP)


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Sampler settings shared by `dit sample` and `dit eval`: the defaults of every cascade
    stage that does not set its own; unset ones are those of trainer.sampling.SamplerSettings
    (25 DDIM steps, CFG 3.0, rescale 0.7); and the `--device` the cascade runs on."""
    p.add_argument("--steps", type=positive_int,
                   help=f"sampling steps (default {DEFAULT_STEPS}; distilled students: their own count unless given)")
    p.add_argument("--cfg", type=guidance_scale,
                   help=f"classifier-free guidance scale (default {DEFAULT_CFG}; distilled students: their guidance "
                        f"input)")
    p.add_argument("--guidance-rescale", type=rescale_fraction,
                   help=f"guidance rescale phi (Lin et al. 2023), in [0, 1] (default {DEFAULT_RESCALE})")
    p.add_argument("--sampler", choices=SAMPLERS, help=f"default {DEFAULT_SAMPLER}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts sampled together")
    p.add_argument("--raw", action="store_true",
                   help="sample the raw (non-EMA) fp32 weights (runs with checkpoint.universal=true, the default)")
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="auto",
                   help="autocast of each stage's forward passes (weights stay fp32): auto (default) is the "
                        "precision the stage was trained in on an accelerator, fp32 on the CPU")
    add_device_argument(p)


def settings_from(args: argparse.Namespace):
    """SamplerSettings with the values given on the command line."""
    from trainer.sampling import SamplerSettings

    given = {field: getattr(args, arg) for arg, field in SETTINGS.items() if getattr(args, arg) is not None}
    return SamplerSettings(**given)


def load_cascade(args: argparse.Namespace):
    """The cascade of CKPT_OR_RECIPE; --steps goes in as asked (None when not given), so that
    `--steps 25` is a request even where 25 is the default (a distilled student's own count
    is used only when none was asked for)."""
    from trainer.cascade import Cascade

    return Cascade.load(args.checkpoint, settings_from(args), ema=not args.raw, device=args.device, steps=args.steps,
                        precision=args.precision)



def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError("--prompt", "give at least one --prompt or a --prompts-file")
    return [p for p in prompts for _ in range(args.num_per_prompt)]


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of `dit sample` on its own parser."""
    p.add_argument("checkpoint", metavar="CKPT_OR_RECIPE", help="checkpoint directory or cascade YAML")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line; # comments")
    p.add_argument("--num-per-prompt", type=positive_int, default=1)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--height", type=int, help="base stage output height in pixels (default: data.resolution)")
    p.add_argument("--width", type=int, help="base stage output width in pixels (default: data.resolution)")
    p.add_argument("--frames", type=int, help="video models: frames per clip (default: data.num_frames)")
    add_sampler_arguments(p)
    p.set_defaults(func=sample)


def sample(args: argparse.Namespace) -> int:
    from trainer.cascade import SampleSize, save_samples

    prompts = read_prompts(args)
    size = SampleSize(args.height, args.width, args.frames)
    try:  # settings or a size a stage cannot take (more steps than its schedule; a size off its patch or
        cascade = load_cascade(args)  # autoencoder, frames for an image model): arguments, exit 2
        cascade.check_size(size)
    except ValueError as e:
        print(f"dit sample: {e}", file=sys.stderr)
        return EXIT_CONFIG
    pixels = cascade.sample_batched(prompts, args.seed, args.batch_size, size=size)  # per-prompt noise
    weights = {s.weights for s in cascade.stages}  # raw where a checkpoint kept no EMA, even without --raw
    meta = {"recipe": str(args.checkpoint), "seed": args.seed,
            "weights": weights.pop() if len(weights) == 1 else "mixed", "device": str(args.device),
            "height": int(pixels.shape[-2]), "width": int(pixels.shape[-1]),
            "stages": [{"checkpoint": str(s.checkpoint), "weights": s.weights, "precision": s.precision,
                        **vars(s.settings), **({"noise_aug": s.cfg.stage.noise_aug_sample} if s.superres else {})}
                       for s in cascade.stages]}  # the settings each stage sampled with (a student's own)
    record = save_samples(pixels, prompts, args.out, meta, cascade.fps)
    kind = "videos" if pixels.ndim == 5 else "images"
    print(f"{len(prompts)} {kind} of {pixels.shape[-2]}x{pixels.shape[-1]} px on {args.device} in {args.out} "
          f"(grid: {Path(args.out) / record['grid']})")
    return 0
