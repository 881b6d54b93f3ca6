"""`dit train CONFIG [overrides]`: the entry every launcher starts on every rank."""
from __future__ import annotations

import argparse
import sys

from launch.job import check_config, resume_config
from launch.runners import record_exit
from trainer.codes import EXIT_CHECKPOINT, catch_preemption, world_from_env
from trainer.config import check_precision_here

ALLOW_CONFIG_CHANGE = "checkpoint.allow_config_change=true"


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the "
                        "differences are listed when this flag is missing)")


def overrides_of(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([ALLOW_CONFIG_CHANGE] if args.allow_config_change else [])


def train(args: argparse.Namespace) -> int:
    """One rank's run; its exit code is recorded for `dit launch` (runners.record_exit), whose
    engines report only the first dead rank's."""
    return record_exit(train_rank(args))


def train_rank(args: argparse.Namespace) -> int:
    catch_preemption()  # first: a rank starting up (imports, engines, a checkpoint load) died of it
    rank, world_size = world_from_env()[:2]
    # Checked before any process group starts, and before the engine's imports.
    cfg = check_config(args.config, overrides_of(args), world_size)
    check_precision_here(cfg)
    cfg, refusal, note = resume_config(cfg, world_size)
    if refusal is not None:
        print(f"dit train: {refusal}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    if note and rank == 0:
        print(f"dit train: {note}", flush=True)
    from trainer.engine import train as run_training

    return run_training(cfg)
