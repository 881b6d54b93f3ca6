"""`dit export CKPT --format safetensors|diffusers --out DIR`: EMA weights for users.

The diffusers export is verified right away: the pipeline is loaded back with diffusers and
sampled from the same noise as our own DDIM sampler, both on --device (default: the
accelerator if present, else cpu); the largest pixel difference is printed (and the command
fails above --tolerance).
"""
from __future__ import annotations

import argparse

from launch.sample_cmd import add_device_argument

VERIFY_PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]
EXIT_MISMATCH = 4


def configure(p: argparse.ArgumentParser) -> None:
    """The arguments of `dit export` on its own parser."""
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint root (uses `latest`) or step directory")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors")
    p.add_argument("--out", required=True, help="output directory: new or empty, or an earlier export, which is "
                                                "replaced whole (a folder of other files is refused)")
    p.add_argument("--raw", action="store_true",
                   help="export the raw (non-EMA) fp32 weights (runs with checkpoint.universal=true, the default)")
    p.add_argument("--no-verify", action="store_true", help="diffusers: skip the generate-and-compare check")
    p.add_argument("--verify-steps", type=int, default=10, help="DDIM steps of the check (should divide T)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |difference| of [0, 1] pixels")
    add_device_argument(p)
    p.set_defaults(func=export)


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
