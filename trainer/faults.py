"""Fault injection for the fault suite, driven by environment variables so that the real
`dit train` command (started by a real launcher) is what the tests exercise.

DIT_INJECT_NAN="RANK@STEP[,STEP...]"    that rank's loss is NaN at those (1-based) steps
DIT_INJECT_KILL_AT="STEP"               every rank kills itself with SIGKILL before step STEP
DIT_INJECT_SAVE_STALL="MARKER[@STEP]"   the save (of STEP, or every save) touches MARKER once
                                        its engine states are written, then stalls before the
                                        commit until MARKER.release exists, so a test can signal
                                        or kill the ranks while a checkpoint is half-written
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional


def _steps(spec: str) -> set[int]:
    return {int(s) for s in spec.split(",") if s}


def nan_steps(rank: int) -> set[int]:
    spec = os.environ.get("DIT_INJECT_NAN", "")
    if not spec:
        return set()
    target, steps = spec.split("@")
    return _steps(steps) if int(target) == rank else set()


def maybe_kill(step: int) -> None:
    """Called before each step: SIGKILL this rank at the configured step (no cleanup runs)."""
    spec = os.environ.get("DIT_INJECT_KILL_AT", "")
    if spec and step in _steps(spec):
        os.kill(os.getpid(), signal.SIGKILL)


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
