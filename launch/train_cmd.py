"""`dit train CONFIG [overrides]`: the entry every launcher starts on every rank."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from trainer.config import RunConfig, load_config, validate

ALLOW_CONFIG_CHANGE = "checkpoint.allow_config_change=true"


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the "
                        "differences are listed when this flag is missing)")


def overrides_of(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([ALLOW_CONFIG_CHANGE] if args.allow_config_change else [])


def resume_config(cfg: RunConfig, world_size: int) -> tuple[RunConfig, Optional[str], str]:
    """(the config this job resumes with, why the checkpoint it would resume from does not fit
    it or None, the line saying what was derived to keep the global batch or '')."""
    from trainer.checkpoint import CheckpointError
    from trainer.engine import preflight_resume

    try:
        cfg, note = preflight_resume(cfg, world_size)
    except CheckpointError as e:
        return cfg, str(e), ""
    return cfg, None, note


def train(args: argparse.Namespace) -> int:
    from trainer.distributed import world_from_env

    cfg = load_config(args.config, overrides_of(args))
    world_size = world_from_env()[1]
    validate(cfg, world_size=world_size)  # before any process group starts, and before the engine's imports
    from trainer.engine import EXIT_CHECKPOINT, train as run_training
    from trainer.stages import preflight

    preflight(cfg)
    cfg, refusal, note = resume_config(cfg, world_size)
    if refusal is not None:
        print(f"dit train: {refusal}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    if note and world_from_env()[0] == 0:
        print(f"dit train: {note}", flush=True)
    return run_training(cfg)
