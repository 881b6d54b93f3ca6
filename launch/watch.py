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
# Signals that stop the job for good (Ctrl-C, a closed terminal): never followed by a restart.
STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP)
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
    zombie its launcher has not reaped yet) and, when it saw the zombie, how that rank ended.

    The DeepSpeed launcher exits with the code of whichever dead rank its once-a-second poll of
    an unordered set meets first: a killed rank's peers fail their next collective within that
    second, so its exit code may name a peer's error instead of the cause. The watcher polls
    10 times as often and reads the zombie's own status, which `launch/runners.py` prefers.
    """

    def __init__(self, root_pid: int):
        import psutil

        super().__init__("rank-watcher")
        self._psutil = psutil
        self._root = psutil.Process(root_pid)
        self._ranks: dict[int, tuple[int, "psutil.Process"]] = {}  # pid -> (rank, process)
        self.first_dead: Optional[int] = None
        self.first_status: Optional[int] = None  # the exit code, or -N for signal N; None: not seen

    def pids(self) -> list[int]:
        return list(self._ranks)

    def kill_alive(self) -> None:
        """SIGKILL to the ranks still running (psutil checks that each pid is still that rank)."""
        for _, proc in list(self._ranks.values()):
            try:
                if self._alive(proc):
                    proc.kill()
            except self._psutil.Error:
                continue

    def _run(self) -> None:
        finished: set[int] = set()  # ranks seen exiting with 0: done, not dead
        while not self._stop.wait(POLL_S) and self.first_dead is None:
            self._discover()
            dead = [(rank, zombie_status(pid)) for pid, (rank, proc) in self._ranks.items()
                    if rank not in finished and not self._alive(proc)]
            finished |= {rank for rank, status in dead if status == 0}
            failed = [(rank, status) for rank, status in dead if status != 0]
            if failed:
                self.first_dead, self.first_status = min(failed, key=_likely_cause)

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


def _likely_cause(dead: tuple[int, Optional[int]]) -> tuple[int, int]:
    """Order of the ranks found dead in one poll: killed by a signal first (its peers then fail
    with an error), then a known status, then the lowest rank."""
    rank, status = dead
    return (0 if status is not None and status < 0 else 1 if status is not None else 2, rank)


def zombie_status(pid: int) -> Optional[int]:
    """How an exited, not yet reaped process ended (Linux: the `exit_code` field, 52nd of
    /proc/<pid>/stat, in waitpid's form): its exit code or -N for signal N; None once reaped or
    where /proc does not say."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # from field 3 on: the name in field 2 may hold spaces
    if len(fields) < 50 or fields[0] != "Z":
        return None
    return os.waitstatus_to_exitcode(int(fields[49]))


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
    ranks themselves (which save and exit with 42), as torchrun's agent does; those still
    alive `shutdown_timeout_s` later get SIGKILL (torchrun's --shutdown-timeout; DeepSpeed's
    own launch.py gives the rest 30 s once a rank has exited). SIGINT/SIGHUP (Ctrl-C, a closed
    terminal) go to the ranks as they are and are recorded, so that the job is stopped rather
    than restarted.

    With `launcher_pid` (a pdsh job: the ranks run on other hosts, none here) every one of
    these signals goes to the DeepSpeed launcher as SIGTERM instead: its handler stops pdsh and
    the launchers of the other hosts, which pass SIGTERM to their ranks.
    """

    def __init__(self, watcher: RankWatcher, shutdown_timeout_s: Optional[float] = None,
                 launcher_pid: Optional[int] = None):
        self.watcher = watcher
        self.shutdown_timeout_s = shutdown_timeout_s
        self.launcher_pid = launcher_pid
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, object] = {}
        self._timer: Optional[threading.Timer] = None

    def __enter__(self) -> "ForwardSignals":
        for sig in (*PREEMPT_SIGNALS, *STOP_SIGNALS):
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _forward(self, signum: int, _frame) -> None:
        first = self.received is None
        if first:  # what the job's outcome says: a preemption, or a stop
            self.received = signal.Signals(signum)
        if self.launcher_pid is not None:
            if first:
                _kill(self.launcher_pid, signal.SIGTERM)
            return
        for pid in self.watcher.pids():
            _kill(pid, signum)
        if first and signum in PREEMPT_SIGNALS and self.shutdown_timeout_s is not None:
            self._timer = threading.Timer(self.shutdown_timeout_s, self._kill_the_rest)
            self._timer.daemon = True
            self._timer.start()

    def _kill_the_rest(self) -> None:
        """The ranks still running when the grace of a preemption is over."""
        self.watcher.kill_alive()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
