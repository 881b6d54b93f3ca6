"""Process-group set-up, cross-rank agreement and preemption signals, kept in one place.

Ranks are started by a launcher (torchrun, the DeepSpeed launcher, srun) that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a single process without them runs as a
world of one. The backend follows DeepSpeed's accelerator, as the step's device does: NCCL
with CUDA, gloo with the CPU accelerator (machines without a GPU, or DS_ACCELERATOR=cpu).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.codes import catch_preemption, preempted, world_from_env


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    pipeline_stages: int
    sequence_parallel: int = 1  # ranks that split one sample's token sequence

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas: pipeline stages of one replica, and the ranks of one
        sequence group, see the same batches."""
        return self.world_size // (self.pipeline_stages * self.sequence_parallel)

    @property
    def dp_rank(self) -> int:
        # DeepSpeed's PipelineModule topology puts the pipe axis outermost: rank = pipe * dp + data;
        # a sequence group is S consecutive ranks (one node's fast links): data = dp * S + sp.
        return (self.rank % (self.world_size // self.pipeline_stages)) // self.sequence_parallel

    @property
    def sp_rank(self) -> int:
        """This rank's place in its sequence group: it holds the sp_rank-th run of N / S tokens."""
        return self.rank % self.sequence_parallel

    @property
    def reads_data(self) -> bool:
        """Whether this rank accounts for its replica's samples (key log, data counts): pipeline
        stage 0 and sequence rank 0, so a batch that several ranks hold is counted once."""
        return self.rank < self.world_size // self.pipeline_stages and self.sp_rank == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(pipeline_stages: int, timeout_s: int, sequence_parallel: int = 1,
                     rank0_timeout_s: int = 3600) -> DistContext:
    """Start (or join) the process group; every collective is bounded by `timeout_s`, but the
    waits for rank 0's own work (`wait_for_rank0`) by `rank0_timeout_s`."""
    import deepspeed

    rank, world, local = world_from_env()
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # port 0: the kernel picks a free one; this process is the store's only client (a port
        # derived from the pid collided between two single-process runs on one machine)
        os.environ.setdefault("MASTER_PORT", "0")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = process_group_backend()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(local)
    _rank0_wait[:] = [dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=rank0_timeout_s)),
                      dist.group.WORLD]
    return DistContext(rank=rank, world_size=world, local_rank=local, pipeline_stages=pipeline_stages,
                       sequence_parallel=sequence_parallel)


# (host group, the world it belongs to) of `wait_for_rank0`, made by `init_distributed`
_rank0_wait: list = []


def wait_for_rank0() -> None:
    """Collective: every rank waits here until rank 0 is done with work of its own (writing a
    checkpoint's whole-tensor files and committing it, removing old ones, a sample grid, an
    eval). The wait is a barrier of a gloo group bounded by deepspeed.rank0_timeout_s; without
    it the others would wait in their next collective, which deepspeed.comm_timeout_s bounds
    (NCCL's watchdog ends the job): 600 s, less than rank 0 takes to write the universal and
    EMA files of a model of some billions of parameters. Nothing without a process group."""
    if not dist.is_initialized():
        return
    if not _rank0_wait or _rank0_wait[1] is not dist.group.WORLD:
        raise RuntimeError("internal: the process group was not started by trainer.distributed.init_distributed")
    dist.barrier(group=_rank0_wait[0])


def process_group_backend() -> str:
    """NCCL when DeepSpeed's accelerator is CUDA, else gloo. Not `torch.cuda.is_available()`:
    a job on the CPU accelerator on a machine with GPUs (DS_ACCELERATOR=cpu) keeps every tensor
    on the host, which NCCL refuses at the first collective."""
    from deepspeed.accelerator import get_accelerator

    return "nccl" if get_accelerator().device_name() == "cuda" else "gloo"


def compute_device() -> torch.device:
    """The device of this rank's step, from DeepSpeed's accelerator: cuda:LOCAL_RANK on GPUs
    (after `init_distributed` set it current), cpu with DS_ACCELERATOR=cpu."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def comm_device() -> torch.device:
    """Where the tensors of a collective must live for the process group's backend: gloo
    reduces host tensors, NCCL (and the other accelerator backends) device tensors only."""
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return compute_device()


def max_over_ranks(flag: float | torch.Tensor) -> torch.Tensor:
    """A (1,) float32 flag reduced with MAX over the ranks, on the backend's device; queued
    behind the device's work, never read here (a host number is written there by a fill, not
    copied: a blocking copy to the device would wait for its queue)."""
    if isinstance(flag, torch.Tensor):  # without a process group it stays where it is
        t = flag.detach().to(comm_device() if dist.is_initialized() else flag.device, torch.float32).reshape(1)
    else:
        t = torch.full((1,), float(flag), device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of integers (lengths may differ), in rank order, through tensors on
    the backend's device (no pickling); [values] without a process group. Collective; reads
    the lengths on the host (for a checkpoint, not a step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [list(values)]
    device = comm_device()
    parts = _all_gather_1d(torch.tensor(values, dtype=torch.int64, device=device), None)
    return [part.tolist() for part in parts]


def all_gather_bytes_on_host(data: bytes) -> list[bytes]:
    """Every rank's bytes, in rank order, through uint8 tensors on the host group of
    `wait_for_rank0` (nothing pickled): a collective the ranks may reach after long work of
    their own, bounded by deepspeed.rank0_timeout_s. [data] without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [data]
    if not _rank0_wait or _rank0_wait[1] is not dist.group.WORLD:
        raise RuntimeError("internal: the process group was not started by trainer.distributed.init_distributed")
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return [part.numpy().tobytes() for part in _all_gather_1d(mine, _rank0_wait[0])]


def _all_gather_1d(mine: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ; same dtype and device), in rank order."""
    world = dist.get_world_size(group)
    length = torch.tensor([len(mine)], dtype=torch.int64, device=mine.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in torch.cat(lengths).tolist()]
    padded = torch.zeros(max(sizes), dtype=mine.dtype, device=mine.device)
    if not any(sizes):
        return [padded[:0] for _ in sizes]
    padded[: len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [part[:n] for part, n in zip(parts, sizes)]


class LateRead:
    """A device value the host reads later without stalling the device's queue: copied
    non-blocking into pinned memory behind an event, so a read waits for that copy only (by the
    next step the device has long done it). Host values are kept as they are."""

    def __init__(self, value: torch.Tensor):
        self._event = None
        if value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value.detach()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the step loop finishes the step and asks all ranks.

    The ranks' answer is read one step late (`LateRead`): asking costs a step no wait for the
    device, and every rank stops at the same step, one after the signal's, well within the
    seconds of grace a scheduler gives."""

    def __init__(self) -> None:
        catch_preemption()  # `dit train` did already, as a rank's first act
        self._asked: LateRead | None = None

    def before_start(self) -> bool:
        """Collective, read at once: had any rank received a preemption signal before the first
        step (while it started)? Then nothing new is there to save."""
        return bool(max_over_ranks(preempted()).item() > 0)

    def agreed(self) -> bool:
        """Collective: had any rank received a preemption signal when the previous step asked?"""
        answer, self._asked = self._asked, LateRead(max_over_ranks(preempted()))
        return answer is not None and bool(answer.get().item() > 0)
