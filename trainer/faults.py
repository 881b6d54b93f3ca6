"""Fault injection for the fault suite, driven by environment variables so that the real
`dit train` command (started by a real launcher) is what the tests exercise. `install` is
called once per rank on the built trainer and does nothing unless a DIT_INJECT_* variable is
set; it wraps the trainer's parts (the stage's losses, the checkpoint manager's hooks and its
`latest`), so the step loop and the checkpoint format hold no branch for it.

DIT_INJECT_NAN="RANK@STEP[,STEP...]"    that rank's loss (and its metrics) is NaN at those (1-based) steps
DIT_INJECT_KILL_AT="[RANK@]STEP"        that rank (default: every rank) kills itself with SIGKILL
                                        in the middle of step STEP, after its forward pass and
                                        before the gradient all-reduce the others wait in
DIT_INJECT_SAVE_STALL="MARKER[@STEP]"   the save (of STEP, or every save) touches MARKER once
                                        its engine states are written, then stalls before the
                                        commit until MARKER.release exists, so a test can signal
                                        or kill the ranks while a checkpoint is half-written
DIT_INJECT_SAVE_ERROR="RANK@STEP[:ERRNO]"  that rank's writes of its engine files of step STEP
                                        fail with OSError ERRNO (default ENOSPC: disk full)
DIT_INJECT_LATEST="RANK@TAG"            that rank reads TAG from `latest` (a checkpoint directory
                                        that is not shared by all nodes)
DIT_INJECT_SIGNAL_AT_START="RANK"       that rank sends itself SIGUSR1 once its trainer is built,
                                        before the resume and the first step (a preemption that
                                        comes while the ranks start)
DIT_INJECT_RANK0_SLOW="SECONDS"         rank 0's sample grids, its write of the module's file in
                                        each engine checkpoint and its whole-tensor files each take
                                        SECONDS longer, as a large model's do
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

PREFIX = "DIT_INJECT_"


def _steps(spec: str) -> set[int]:
    return {int(s) for s in spec.split(",") if s}


def _for_rank(name: str, rank: int) -> str:
    """The part after `RANK@` of the variable when it targets this rank ('' otherwise)."""
    spec = os.environ.get(name, "")
    if not spec:
        return ""
    target, _, value = spec.partition("@")
    return value if int(target) == rank else ""


def requested() -> bool:
    return any(name.startswith(PREFIX) and value for name, value in os.environ.items())


def install(trainer: Any) -> None:
    """Install on this rank's trainer (trainer/engine.py's Trainer) the faults the DIT_INJECT_*
    variables ask for; nothing when none is set."""
    if not requested():
        return
    rank = trainer.ctx.rank
    inject_into_losses(trainer, nan_steps(rank), kill_steps(rank))
    trainer.ckpt.before_commit = save_stall()
    trainer.ckpt.before_write = save_error(rank)
    slow = os.environ.get("DIT_INJECT_RANK0_SLOW", "")
    if slow and rank == 0:
        slow_down(trainer, float(slow))
    tag = latest_override(rank)
    if tag:
        read_latest_as(trainer.ckpt, tag)
    spec = os.environ.get("DIT_INJECT_SIGNAL_AT_START", "")
    if spec and int(spec) == rank:
        os.kill(os.getpid(), signal.SIGUSR1)


def inject_into_losses(trainer: Any, nan: set[int], kill: set[int]) -> None:
    """Wrap the stage's losses: at the (1-based) steps in `nan` this rank's loss is NaN; at those
    in `kill` this rank dies after its forward pass, before the backward's gradient all-reduce."""
    if not nan and not kill:
        return
    losses = trainer.stage.losses

    def injected(batch: dict, draws) -> Iterator[tuple]:
        step = trainer.state.step + 1
        for player, loss, info in losses(batch, draws):
            if step in nan:  # the loss and what is logged of it, as a forward that overflowed
                loss = loss * float("nan")
                info = {k: (v[0] * float("nan"), v[1]) if isinstance(v, tuple) else v * float("nan")
                        for k, v in info.items()}
            if step in kill:
                kill_now()
            yield player, loss, info

    trainer.stage.losses = injected


def read_latest_as(ckpt: Any, tag: str) -> None:
    """This rank reads TAG from `latest`, as a node whose checkpoint directory is not shared."""
    latest = ckpt.latest

    def injected() -> Optional[Path]:
        found = latest()
        return None if found is None else found.with_name(tag)

    ckpt.latest = injected


def nan_steps(rank: int) -> set[int]:
    return _steps(_for_rank("DIT_INJECT_NAN", rank))


def kill_steps(rank: int) -> set[int]:
    """Steps in the middle of which this rank SIGKILLs itself (no cleanup runs)."""
    spec = os.environ.get("DIT_INJECT_KILL_AT", "")
    return _steps(spec) if spec and "@" not in spec else _steps(_for_rank("DIT_INJECT_KILL_AT", rank))


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def latest_override(rank: int) -> str:
    return _for_rank("DIT_INJECT_LATEST", rank)


def slow_down(trainer: Any, seconds: float) -> None:
    """Rank 0's own work made `seconds` longer (the work the other ranks wait for in
    `trainer.distributed.wait_for_rank0`): its sample grids, the module's file DeepSpeed has it
    write, and its whole-tensor files (before the commit)."""
    draw, write, commit = trainer.stage.write_samples, trainer.ckpt.before_write, trainer.ckpt.before_commit

    def slow_grid(*args, **kwargs):
        time.sleep(seconds)  # the injected fault: work that takes this long
        return draw(*args, **kwargs)

    def slow_write(path: str) -> None:
        if "model_states" in Path(path).name:
            time.sleep(seconds)
        if write is not None:
            write(path)

    def slow_commit(step: int, tmp_dir: Path) -> None:
        time.sleep(seconds)
        if commit is not None:
            commit(step, tmp_dir)

    trainer.stage.write_samples = slow_grid
    trainer.ckpt.before_write, trainer.ckpt.before_commit = slow_write, slow_commit


def save_stall() -> Optional[Callable[[int, Path], None]]:
    spec = os.environ.get("DIT_INJECT_SAVE_STALL", "")
    if not spec:
        return None
    marker, _, only = spec.partition("@")

    def stall(step: int, _tmp_dir: Path) -> None:
        if only and step != int(only):
            return
        Path(marker).touch()
        release = Path(marker + ".release")
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting on the test's signal: the stall is the injected fault

    return stall


def save_error(rank: int) -> Optional[Callable[[str], None]]:
    """Raises OSError (default ENOSPC) when this rank writes an engine file of step STEP."""
    spec = _for_rank("DIT_INJECT_SAVE_ERROR", rank)
    if not spec:
        return None
    step_text, _, code_text = spec.partition(":")
    code = int(code_text) if code_text else errno.ENOSPC
    directory = f"step_{int(step_text):08d}"

    def fail(path: str) -> None:
        if directory in Path(path).parent.parent.name:
            raise OSError(code, os.strerror(code), path)

    return fail
