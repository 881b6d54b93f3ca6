"""A loader worker's progress count below the stages: the stages count each sample they begin
or read on the mark they are given (stages.begin), and the layers under them, which are given
no mark, count here each block they read from a remote store or a pipe and each block of a
shard they download into the cache, so that the main process's stall watch (workers.Watch)
sees a worker that waits on a slow store move on. One count per process: the mark of the
worker it is (`track`); where none was set (the main process, tools), counting does nothing.

Only the thread that tracks counts, not the read-ahead thread downloading the next shard meanwhile
(a decoder hung in the worker's own thread would otherwise look busy for as long as that download
lasts), except while the tracking thread waits for that download (`waiting`): then its blocks are
the worker's progress."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

PROGRESS = 3  # the field of a worker's mark that counts its steps (stream.SampleMarks)

_mark: Optional[memoryview] = None
_owner: Optional[int] = None  # the thread that tracks
_lent = False  # the tracking thread waits for another's work: its steps count


def track(mark: Optional[memoryview]) -> None:
    """Count this thread's steps on `mark` from now on (a worker's, as it starts)."""
    global _mark, _owner
    _mark, _owner = mark, threading.get_ident()


def step() -> None:
    """One step of progress, where this process is a watched worker and this thread is the one
    that tracks (or the one it waits for)."""
    if _mark is not None and (_lent or threading.get_ident() == _owner):
        _mark[PROGRESS] += 1


@contextmanager
def waiting() -> Iterator[None]:
    """While the tracking thread waits for another thread's work, that thread's steps count."""
    global _lent
    lent, _lent = _lent, threading.get_ident() == _owner or _lent
    try:
        yield
    finally:
        _lent = lent
