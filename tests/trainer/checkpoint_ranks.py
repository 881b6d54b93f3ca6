"""The ranks of tests/trainer/test_checkpoint_files.py's hashing test, under torchrun with 2
ranks over gloo: a save where each rank hashes and flushes the files it wrote, then a resume's
check of a file one rank changed. Prints, per rank, `<rank> synced <names>` (the files this
rank flushed, relative to the step directory), `<rank> verified`, and `<rank> refused <error>`
once its own file was changed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, CheckpointManager, RankState
from trainer.config import CheckpointConfig
from trainer.distributed import init_distributed, wait_for_rank0


def main(root: str) -> None:
    ctx = init_distributed(1, 60)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    os.fsync = recording
    manager = CheckpointManager(CheckpointConfig(dir=root), ctx.rank, ctx.world_size)
    state = RankState({"rank": ctx.rank}, {"rng": torch.arange(1000 * (ctx.rank + 1), dtype=torch.int64)})
    final = manager.save(1, {}, state, "{}\n", {"ema.safetensors": {"w": torch.ones(300)}})
    os.fsync = real_fsync
    tmp = str(final.with_name(".tmp-" + final.name))
    files = sorted({p[len(tmp) + 1:] for p in synced if p.startswith(tmp + "/") and not p.endswith("COMPLETE.json")})
    say(f"{ctx.rank} synced {' '.join(files)}")
    manager.verify(final)
    say(f"{ctx.rank} verified")
    wait_for_rank0()
    if ctx.rank == 1:
        with open(final / "rank_00001.safetensors", "r+b") as f:
            f.seek(-1, 2)
            f.write(b"\xff")
    wait_for_rank0()
    try:
        manager.verify(final)
    except CheckpointError as e:
        say(f"{ctx.rank} refused {e}")
    wait_for_rank0()  # no rank exits while its peer's gloo still sends it the last all_gather (an abort at exit)


def say(line: str) -> None:
    """One line in one write: the ranks share torchrun's stdout, and print's text and newline
    are two writes that another rank's line can come between."""
    os.write(1, f"{line}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1])
