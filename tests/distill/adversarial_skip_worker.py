"""Run by tests/distill/test_adversarial_skips.py as one rank (a real `Trainer`: DeepSpeed
engines over gloo, tar shards, checkpoints): an adversarial run where ONE player's loss is NaN
at given steps. The fault suite's DIT_INJECT_NAN (trainer/faults.py) makes every player's loss
NaN; here each player's finite guard must skip on its own.

    python -m tests.distill.adversarial_skip_worker PLAYER@STEP[,PLAYER@STEP...] CONFIG [OVERRIDES...]
        [-- OVERRIDES...]...

Each `--` starts another run, with the overrides before the first `--` and its own, in the same
process (one start-up: most of a tiny run's time). Exits with the first failing run's exit code."""
from __future__ import annotations

import sys
from typing import Iterator

import torch.distributed as dist

from trainer.config import load_config
from trainer.engine import Trainer


def nan_at(spec: str) -> set[tuple[str, int]]:
    """(player, 1-based step) pairs of `PLAYER@STEP,...`."""
    return {(player, int(step)) for player, _, step in (part.partition("@") for part in spec.split(","))}


def inject(trainer: Trainer, faults: set[tuple[str, int]]) -> None:
    """Wrap the stage's losses: a player's loss is NaN at its steps in `faults`, the other's as computed."""
    losses = trainer.stage.losses

    def injected(batch: dict, draws) -> Iterator[tuple]:
        for player, loss, info in losses(batch, draws):
            yield player, loss * float("nan") if (player, trainer.state.step + 1) in faults else loss, info

    trainer.stage.losses = injected


def runs(args: tuple[str, ...]) -> list[list[str]]:
    """The overrides of each run: the common ones, then each `--` group's own."""
    groups: list[list[str]] = [[]]
    for arg in args:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    common, *own = groups
    return [common + extra for extra in own] or [common]


def main(spec: str, config: str, *args: str) -> int:
    code = 0
    for overrides in runs(args):
        trainer = Trainer(load_config(config, overrides))
        inject(trainer, nan_at(spec))
        code = code or trainer.run()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
