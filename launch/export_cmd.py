"""`dit export CKPT --format safetensors|diffusers --out DIR`: EMA weights for users.

The diffusers export is verified right away: the pipeline is loaded back with diffusers and
sampled from the same noise as our own DDIM sampler, both on --device (default: the
accelerator if present, else cpu); the largest pixel difference is printed (and the command
fails above --tolerance). --verify-steps and --tolerance set that check: with --format
safetensors or --no-verify, which run none, they are refused.
"""
from __future__ import annotations

import argparse
from functools import partial

from launch.sample_cmd import add_device_argument

VERIFY_PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]
EXIT_MISMATCH = 4
VERIFY_STEPS = 10  # --verify-steps by default
TOLERANCE = 1e-3  # --tolerance by default


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of `dit export` on its own parser."""
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root (uses `latest`) or step directory")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors")
    p.add_argument("--out", required=True, help="output directory: new or empty, or an earlier export, which is "
                                                "replaced whole (a folder of other files is refused)")
    p.add_argument("--raw", action="store_true",
                   help="export the raw (non-EMA) fp32 weights (runs with checkpoint.universal=true, the default)")
    p.add_argument("--no-verify", action="store_true", help="diffusers: skip the generate-and-compare check")
    p.add_argument("--verify-steps", type=int,
                   help=f"diffusers: DDIM steps of the check (should divide T; default {VERIFY_STEPS})")
    p.add_argument("--tolerance", type=float,
                   help=f"diffusers: max |difference| of [0, 1] pixels (default {TOLERANCE})")
    add_device_argument(p)
    p.set_defaults(func=partial(checked_export, p))


def checked_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`export` once the options of the check are resolved (`resolve_verify_options`)."""
    resolve_verify_options(parser, args)
    return export(args)


def resolve_verify_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--verify-steps and --tolerance, their defaults where not given; given where no check
    runs (--format safetensors, --no-verify), they are refused through the parser (exit 2)
    before anything loads: a value equal to the default, given, is still a request."""
    given = [flag for flag, value in (("--verify-steps", args.verify_steps), ("--tolerance", args.tolerance))
             if value is not None]
    if given and (args.format != "diffusers" or args.no_verify):
        why = "--no-verify skips it" if args.format == "diffusers" else f"--format {args.format} runs none"
        one = len(given) == 1
        parser.error(f"{' and '.join(given)} {'sets' if one else 'set'} the check of a diffusers export, and {why}: "
                     f"drop {'it' if one else 'them'}")
    args.verify_steps = VERIFY_STEPS if args.verify_steps is None else args.verify_steps
    args.tolerance = TOLERANCE if args.tolerance is None else args.tolerance


def export(args: argparse.Namespace) -> int:
    from trainer.export import export as run_export
    from trainer.export import exported_weights, verify_diffusers_export

    out = run_export(args.checkpoint, args.format, args.out, ema=not args.raw)
    weights = exported_weights(out)  # raw where the checkpoint kept no EMA, even without --raw
    print(f"exported {args.checkpoint} ({'EMA' if weights == 'ema' else weights} weights) as {args.format} to {out}")
    if args.format != "diffusers" or args.no_verify:
        return 0
    error = verify_diffusers_export(out, args.checkpoint, VERIFY_PROMPTS, steps=args.verify_steps,
                                    ema=weights == "ema", device=args.device)
    verdict = "ok" if error <= args.tolerance else "MISMATCH"
    print(f"diffusers check on {args.device} ({args.verify_steps} DDIM steps, same noise): "
          f"max |pixel difference| {error:.2e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if error <= args.tolerance else EXIT_MISMATCH
