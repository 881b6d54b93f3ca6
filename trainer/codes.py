"""Numbers and names shared by the trainer and the `dit` command, importable without torch
(so that `dit launch --help` and `dit launch --slurm --dry-run` start fast).

Exit codes of `dit train` (and of `dit launch`, which passes on the first failed rank's):
"""
from __future__ import annotations

import os
import signal

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3  # too many non-finite steps in a row
EXIT_CHECKPOINT = 4
EXIT_DATA = 5  # the data is unusable: no shards, no full batch, or past data.error_budget
EXIT_REQUEUE = 42  # preempted (SIGTERM/SIGUSR1): state saved, requeue and rerun the same command

EXIT_MEANING = {
    1: "an uncaught exception",
    EXIT_CONFIG: "a config error",
    EXIT_NONFINITE: "too many non-finite steps in a row",
    EXIT_CHECKPOINT: "a checkpoint error",
    EXIT_DATA: "unusable data (see the skipped-sample warnings)",
    EXIT_REQUEUE: "preempted, state saved",
}

# The samplers of trainer/diffusion/samplers.py (its SAMPLERS dict holds the functions).
SAMPLER_NAMES = ("ddim", "euler", "dpmpp2m", "ddpm")
# The defaults of its SamplerSettings, for `dit sample|eval --help` (the stages' own where a
# cascade sets none): steps, CFG scale, guidance rescale, sampler.
DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_RESCALE, DEFAULT_SAMPLER = 25, 3.0, 0.7, "ddim"
# `dit sample|eval --precision`: autocast of sampling (trainer.cascade.sampling_precision)
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def world_from_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as the launcher set them; a bare process is a world of one."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_preempted: list[int] = []  # the preemption signals this process received (`catch_preemption`)


def catch_preemption() -> None:
    """From now on record SIGTERM / SIGUSR1 (a preemption, a scheduler's warning before the
    time limit) instead of dying of them. A rank calls it first: before its imports, engine
    builds and checkpoint load (minutes on a large model), either signal ended it with nothing
    saved and no requeue. The step loop asks every rank (trainer.distributed.PreemptionFlag)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _record)


def _record(signum: int, _frame) -> None:
    _preempted.append(signum)


def preempted() -> bool:
    """Whether this process received a preemption signal since `catch_preemption`."""
    return bool(_preempted)
