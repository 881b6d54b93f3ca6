"""`dit bench model|distill|sequence`: argparse glue only.

Their implementations (`launch.bench_model`, `launch.bench_distill`, `launch.bench_sequence`)
import torch at the top, which costs seconds; `launch/cli.py` builds every subcommand's parser
on each call, `dit train` refusing a bad config included. So the arguments live here, each
command's `--help` text is its implementation's docstring read from source, and the
implementation is imported only when its command runs.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from launch.sample_cmd import add_device_argument


def lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """`func` of `module`, imported when the command runs (keeps building the parser fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return run


def docstring(module: str) -> str:
    """`module`'s docstring, parsed from its source without importing it."""
    origin = importlib.util.find_spec(module).origin
    return ast.get_docstring(ast.parse(Path(origin).read_text())) or ""


def add_bench(bench_subparsers: argparse._SubParsersAction, name: str, help_: str, module: str,
              func: str) -> argparse.ArgumentParser:
    """`dit bench NAME`, described by `module`'s docstring, running `module.func` when chosen."""
    p = bench_subparsers.add_parser(name, help=help_, description=docstring(module),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lazy(module, func))
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=384, help="text token width (MiniLM: 384)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    add_device_argument(p)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="precision of both forwards: fp32, or bf16 autocast over fp32 weights")
    p.add_argument(
        "--presets",
        nargs="*",
        default=["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"],
        help="presets for the params/MACs table (none: skip it)",
    )


def register_model(bench_subparsers: argparse._SubParsersAction) -> None:
    add_model_arguments(add_bench(bench_subparsers, "model", "our DiT vs diffusers PixArt: fwd+bwd step-time ratio, "
                                  "preset params and MACs", "launch.bench_model", "run"))


def register_distill(bench_subparsers: argparse._SubParsersAction) -> None:
    p = add_bench(bench_subparsers, "distill", "teacher vs distilled students: NFE, wall time per image, prompt "
                  "adherence", "launch.bench_distill", "bench_distill")
    p.add_argument("--teacher", default="runs/demo/checkpoints",
                   help="teacher checkpoint (root with `latest` or step dir)")
    p.add_argument("--progressive", default="runs/distill_progressive/checkpoints",
                   help="checkpoint dir of a progressive run (its round exports are under rounds/)")
    p.add_argument("--adversarial", default="runs/distill_adversarial/checkpoints", help="adversarial run's checkpoint")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--progressive-steps", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--adversarial-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the teacher's log.sample_cfg)")
    p.add_argument("--num", type=int, default=64, help="held-out captions to sample")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    add_device_argument(p)


def register_sequence(bench_subparsers: argparse._SubParsersAction) -> None:
    p = add_bench(bench_subparsers, "sequence", "peak memory per rank of a long clip, whole (S=1) vs split over S "
                  "ranks (Ulysses)", "launch.bench_sequence", "bench_sequence")
    p.add_argument("--preset", default="DiT-T/2")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--attention", choices=("full", "factorized"), default="full")
    p.add_argument("--policy", choices=("none", "attention", "full"), default="none",
                   help="activation checkpointing per block")
    p.add_argument("--frames", type=int, default=16, help="latent frames of the clip")
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2, help="S, the ranks of the sequence group")


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    register_model(bench_subparsers)
    register_distill(bench_subparsers)
    register_sequence(bench_subparsers)
