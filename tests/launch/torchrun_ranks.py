"""The torchrun runner of `dit launch` (launch/runners.py run_job) over ranks that start in a
blink, for the preemption tests of test_launcher.py: what the launcher makes of the ranks'
exit codes after SIGTERM, without a training run.

    python -m tests.launch.torchrun_ranks launch CODES FOLDER   the launcher (one attempt)
    python -m tests.launch.torchrun_ranks rank CODES FOLDER     a rank (started by torchrun)

CODES: one entry per rank, comma-separated: the code it exits with on SIGTERM, or `killed`
for a rank that leaves SIGTERM to its default action (one still importing). Each rank creates
FOLDER/ready<RANK> once it handles the signal, then waits for it.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.job import Job, Topology, free_port
from launch.runners import run_job

KILLED = "killed"


@dataclass(frozen=True)
class RanksJob(Job):
    """The job of `dit launch --launcher torchrun` with this module's ranks instead of `dit train`."""

    codes: str = ""
    folder: str = ""

    def rank_command(self) -> list[str]:
        return ["tests.launch.torchrun_ranks", "rank", self.codes, self.folder]


def rank(codes: str, folder: str) -> None:
    code = codes.split(",")[int(os.environ["RANK"])]
    if code != KILLED:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(code)))
    Path(folder, f"ready{os.environ['RANK']}").touch()
    while True:
        signal.pause()


def launch(codes: str, folder: str) -> int:
    nproc = len(codes.split(","))
    job = RanksJob(config="unused.yaml", overrides=(), launcher="torchrun",
                   topology=Topology(nproc, master_port=free_port()), log_dir=Path(folder) / "launch", gpu=False,
                   shutdown_timeout_s=30, codes=codes, folder=folder)
    return run_job(job)


if __name__ == "__main__":
    role, codes_arg, folder_arg = sys.argv[1:]
    if role == "rank":
        rank(codes_arg, folder_arg)
    sys.exit(launch(codes_arg, folder_arg))
