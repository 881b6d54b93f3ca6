"""The `dit` command line: one console script, one subcommand per job.

Entry points stay tiny: each subcommand parses its arguments and calls a public function of
the room that owns the work (`data_pipeline`, `trainer`, `launch`).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys
from pathlib import Path
from typing import Optional

from launch.bench_cli import lazy
from trainer.checkpoint_format import CheckpointError, is_checkpoint
from trainer.codes import EXIT_CHECKPOINT, EXIT_CONFIG
from trainer.config import ConfigError, load_config, to_yaml

SAMPLE_HELP = "text -> base -> super-resolution -> decode: PNG/MP4 and a grid"
EVAL_HELP = "prompt-adherence judge, distribution distance, memorization audit"
EXPORT_HELP = "export EMA weights as safetensors or a diffusers directory"


def _cmd_config_show(args: argparse.Namespace) -> int:
    """A run config resolved; a checkpoint's own config.yaml as it trained (`trained`)."""
    trained = is_checkpoint(Path(args.config).parent)
    cfg = load_config(args.config, args.overrides, trained=trained)
    if args.key:
        node = cfg
        for part in args.key.split("."):
            if not hasattr(node, part):
                raise ConfigError(args.key, "no such key")
            node = getattr(node, part)
        print(node)
    else:
        print(to_yaml(cfg), end="")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect run configs")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="{show}")
    show = csub.add_parser(
        "show",
        help="print the resolved config (YAML + overrides), or one key with --key",
        description="Resolve CONFIG with dotted overrides (optim.lr=3e-4) and print it as YAML.",
    )
    show.add_argument("config", help="YAML file under configs/")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    show.add_argument("--key", help="print only this dotted key")
    show.set_defaults(func=_cmd_config_show)


def _add_run_command(sub: argparse._SubParsersAction, name: str, help_: str, module: str, func: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("config", help="YAML run config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stage.steps=200")
    p.set_defaults(func=lazy(module, func))
    return p


def _register(module: str, attr: str, target) -> None:
    """Let a room add its own subcommands (`register(subparsers)`) or arguments
    (`configure(parser)`)."""
    getattr(importlib.import_module(module), attr)(target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit",
        description=(
            "Distributed training of text-to-image and text-to-video diffusion transformers: "
            "shards -> streaming loader -> DeepSpeed training -> distillation -> sampling."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config(sub)
    data = sub.add_parser("data", help="write, synthesize, inspect and precompute WebDataset shards")
    _register("launch.data_cmd", "register", data.add_subparsers(dest="data_cmd", required=True))
    train = _add_run_command(sub, "train", "train one stage on this rank (launchers start this on every rank)", "launch.train_cmd", "train")
    _register("launch.train_cmd", "add_resume_arguments", train)
    demo = _add_run_command(sub, "demo", "the end-to-end demo: synthetic shards -> autoencoder -> DiT -> samples", "launch.demo", "demo")
    demo.add_argument("--nproc", type=int, default=2, help="local processes for the DeepSpeed stages")
    demo.epilog = ("Overrides are the DiT config's keys; those of run.*, model.autoencoder.*, deepspeed.* and "
                   "the dataset and pixel keys of data.* reach the autoencoder stage too, and "
                   "autoencoder:KEY=VALUE sets a key of the autoencoder stage alone.")
    demo.add_argument("--resume", action="store_true",
                      help="continue an interrupted demo from its checkpoints instead of starting over")
    _register("launch.launcher", "register", sub)  # `dit launch CONFIG [overrides] ...`
    _register("launch.plan", "register", sub)  # `dit plan CONFIG [overrides] --gpus N`
    _register("launch.sample_cmd", "configure", sub.add_parser("sample", help=SAMPLE_HELP, description=SAMPLE_HELP))
    evaluate = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
    _register("launch.eval_cmd", "register", evaluate.add_subparsers(dest="eval_cmd", required=True))
    _register("launch.export_cmd", "configure", sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP))
    bench = sub.add_parser("bench", help="benchmarks that print a ratio measured side by side in one run")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    _register("launch.data_cmd", "register_bench", bsub)
    _register("launch.bench_cli", "register_bench", bsub)  # model, distill, sequence
    _register("launch.bench_quality", "register_bench", bsub)
    _register("launch.bench_gpu", "register_bench", bsub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    _skip_final_collections()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"dit: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointError as e:  # a checkpoint a command cannot use (`dit sample --raw` without universal files)
        print(f"dit: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except FileNotFoundError as e:
        # A path on the command line or in the config that is not there (a checkpoint, an
        # autoencoder folder, a teacher): one line, as a bad key. Not in a `dit train` rank: a file
        # gone mid-run (a shared file system's hiccup) fails it with 1, which `dit launch` restarts.
        if args.command == "train":
            raise
        print(f"dit: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _skip_final_collections() -> None:
    """At exit, after the handlers the command registers (atexit runs last-in first-out), move
    every live object to the permanent generation (gc.freeze): the interpreter's final
    collections skip it. They walked the whole heap of torch, transformers and DeepSpeed several
    times: ~1.8 s at the end of every `dit` process, and a 2-rank launch on 2 cores ended ~3 s
    sooner without them. Objects are still freed by reference counting; only cycles left at exit
    stay uncollected."""
    atexit.unregister(gc.freeze)  # registered once, however often `main` runs in one process
    atexit.register(gc.freeze)


if __name__ == "__main__":
    sys.exit(main())
