"""A loader worker's progress count below the stages: the stages count each sample they begin
or read on the mark they are given (stages.begin), and the layers under them, which are given
no mark, count here each block they read from a remote store or a pipe and each block of a
shard they download into the cache, so that the main process's stall watch (workers.Watch)
sees a worker that waits on a slow store move on. One count per process: the mark of the
worker it is (`track`); where none was set (the main process, tools), counting does nothing."""
from __future__ import annotations

from typing import Optional

PROGRESS = 3  # the field of a worker's mark that counts its steps (stream.SampleMarks)

_mark: Optional[memoryview] = None


def track(mark: Optional[memoryview]) -> None:
    """Count this process's steps on `mark` from now on (a worker's, as it starts)."""
    global _mark
    _mark = mark


def step() -> None:
    """One step of progress of this process, where it is a watched worker."""
    if _mark is not None:
        _mark[PROGRESS] += 1
