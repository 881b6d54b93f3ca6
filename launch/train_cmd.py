"""`dit train CONFIG [overrides]`: the entry every launcher starts on every rank."""
from __future__ import annotations

import argparse

from trainer.config import load_config, validate
from trainer.distributed import world_from_env


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=world_from_env()[1])  # before any process group starts
    from trainer.engine import train as run_training

    return run_training(cfg)
