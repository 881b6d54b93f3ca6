"""The runners of `dit launch` (launch/runners.py run_job: torchrun, or the DeepSpeed launcher)
over ranks that start in a blink, for the preemption tests of test_launcher.py: what the
launcher makes of the ranks' exit codes after SIGTERM, without a training run.

    python -m tests.launch.torchrun_ranks launch CODES FOLDER [LAUNCHER]   the launcher (one attempt;
                                                                          LAUNCHER: torchrun by default)
    python -m tests.launch.torchrun_ranks rank CODES FOLDER                a rank (started by the launcher)

CODES: one entry per rank, comma-separated: the code it exits with on SIGTERM, `killed` for a
rank that leaves SIGTERM to its default action (one still importing), or `late:N` for a rank
still saving when the first SIGTERM comes, which exits with N on the next one (the engine's,
once a peer has exited). Each rank creates FOLDER/ready<RANK> (holding its pid) once it handles
the signal, then waits for it. A rank records its code as `dit train` does (runners.record_exit).
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.job import Job, Topology, free_port
from launch.runners import record_exit, run_job

KILLED = "killed"
LATE = "late:"


@dataclass(frozen=True)
class RanksJob(Job):
    """The job of `dit launch` with this module's ranks instead of `dit train`."""

    codes: str = ""
    folder: str = ""

    def rank_command(self) -> list[str]:
        return ["tests.launch.torchrun_ranks", "rank", self.codes, self.folder]


def rank(codes: str, folder: str) -> None:
    code = codes.split(",")[int(os.environ["RANK"])]
    if code.startswith(LATE):
        signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, exit_with(code[len(LATE):])))
    elif code != KILLED:
        signal.signal(signal.SIGTERM, exit_with(code))
    Path(folder, f"ready{os.environ['RANK']}").write_text(str(os.getpid()))
    while True:
        signal.pause()


def exit_with(code: str):
    """A SIGTERM handler that exits with `code`, recorded as `dit train` records it."""
    return lambda *_: sys.exit(record_exit(int(code)))


def launch(codes: str, folder: str, launcher: str = "torchrun") -> int:
    nproc = len(codes.split(","))
    job = RanksJob(config="unused.yaml", overrides=(), launcher=launcher,
                   topology=Topology(nproc, master_port=free_port()), log_dir=Path(folder) / "launch", gpu=False,
                   shutdown_timeout_s=30, codes=codes, folder=folder)
    return run_job(job)


if __name__ == "__main__":
    role, codes_arg, folder_arg, *launcher_arg = sys.argv[1:]
    if role == "rank":
        rank(codes_arg, folder_arg)
    sys.exit(launch(codes_arg, folder_arg, *launcher_arg))
