"""The helpers that watch the DeepSpeed launcher while it runs (launch/runners.py): it reports
only an exit code and prints every rank, so these find which rank died first, copy rank 0's
log to the console, and pass preemption signals on to the ranks.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

# Signals after which the ranks save and exit with EXIT_REQUEUE (trainer/distributed.py).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.1  # how often the helpers look at the process tree and logs


class _Background:
    """A daemon thread running `_run` for the duration of a `with` block; `_run` polls until
    `self._stop` is set."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class RankWatcher(_Background):
    """Follows the launcher's process tree and records the first rank seen dead (exited, or a
    zombie its launcher has not reaped yet)."""

    def __init__(self, root_pid: int):
        import psutil

        super().__init__("rank-watcher")
        self._psutil = psutil
        self._root = psutil.Process(root_pid)
        self._ranks: dict[int, tuple[int, "psutil.Process"]] = {}  # pid -> (rank, process)
        self.first_dead: Optional[int] = None

    def pids(self) -> list[int]:
        return list(self._ranks)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S) and self.first_dead is None:
            self._discover()
            for pid, (rank, proc) in list(self._ranks.items()):
                if not self._alive(proc):
                    self.first_dead = rank
                    break

    def _discover(self) -> None:
        """Ranks are the processes with RANK whose parent has none (the engine's agent):
        programs a rank runs itself (compilers, loader workers) inherit RANK but are not ranks."""
        try:
            children = self._root.children(recursive=True)
        except self._psutil.Error:
            return
        for proc in children:
            if proc.pid in self._ranks:
                continue
            try:
                rank = proc.environ().get("RANK")
                parent_rank = proc.parent().environ().get("RANK") if proc.parent() else None
            except self._psutil.Error:
                continue
            if rank is not None and parent_rank is None:
                self._ranks[proc.pid] = (int(rank), proc)

    def _alive(self, proc) -> bool:
        try:
            return proc.is_running() and proc.status() != self._psutil.STATUS_ZOMBIE
        except self._psutil.Error:
            return False


class LogFollower(_Background):
    """Copies the log of this node's first rank (`*_rank<N>.log`, lowest N) to the console
    while the DeepSpeed launcher runs, then what is left of it once the launcher is done."""

    def __init__(self, folder: Path, out=None):
        super().__init__("log-follower")
        self.folder = folder
        self.out = out or sys.stdout

    def first_rank_log(self) -> Optional[Path]:
        logs = [(int(m[1]), p) for p in self.folder.glob("*_rank*.log")
                if (m := re.search(r"_rank(\d+)\.log$", p.name))]
        return min(logs)[1] if logs else None

    def _run(self) -> None:
        path = self.first_rank_log()
        while path is None and not self._stop.wait(POLL_S):
            path = self.first_rank_log()
        if path is None:
            return
        with open(path, errors="replace") as f:
            while True:
                stopping = self._stop.is_set()  # read before draining: nothing is lost
                chunk = f.read()
                if chunk:
                    self.out.write(chunk)
                    self.out.flush()
                if stopping:
                    return
                self._stop.wait(POLL_S)


class ForwardSignals:
    """While the DeepSpeed launcher runs, SIGTERM/SIGUSR1 sent to this command go to the
    ranks themselves (which save and exit with 42), as torchrun's agent does."""

    def __init__(self, watcher: RankWatcher):
        self.watcher = watcher
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "ForwardSignals":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, _frame) -> None:
        self.received = signal.Signals(signum)
        for pid in self.watcher.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
