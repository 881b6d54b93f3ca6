"""Batch pixels from the loader workers to the main process through reused shared memory.

A loader worker (workers.py) that pickled its batch through its pipe of 64 KiB to the main
process: a uint8 batch of 32 x 128 x 128 x 3 (1.5 MB) took ~25 writes, as many wake-ups of both
processes and four copies (pickle, pipe in, pipe out, unpickle), measured at more CPU than
decoding the batch's JPEGs. torch's own tensor sharing would make a new shared-memory file
per batch (created, zero-filled, mapped twice, in /dev/shm: 64 MB by default in Docker).

Here the main process maps, before the workers are forked, a few slots per worker: anonymous
shared memory (nothing in /dev/shm), one mapping per slot. A worker stacks a batch's clips
straight into a free slot of its own and sends only where they lie; the main process hands
out tensors over the slot itself (no copy) and the slot becomes free again when the last of
them is gone, or, when the batch must be pinned for the GPU, copies it once into pinned
memory (the copy `pin_memory` makes anyway) and frees the slot at once. A worker that finds
no free slot (the caller keeps many batches) sends that batch through the pipe instead, so
no one ever waits for memory.

`busy[worker, slot]` is the only shared state: the worker sets it (0 -> 1) before writing a
slot, the main process clears it (1 -> 0) once nothing reads the slot; neither writes a flag
the other may be writing, so no lock is needed. The pipe message that announces a slot is
sent after its pixels are written.
"""
from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import weakref
from typing import NamedTuple

import numpy as np
import torch

PIXEL_FIELDS = ("__pixels__", "__pixels_sr__")  # lists of clips (F, H, W, 3) until stacked
_ALIGN = 64

# Forked workers inherit the mappings; a spawned one would not see them.
FORK = multiprocessing.get_context("fork")


class InSlot(NamedTuple):
    """Where a stacked pixel array lies: worker, slot, byte offset in the slot, shape. A tuple:
    it crosses the pipe with every batch, and a tuple unpickles in a third of a dataclass's time."""

    worker: int
    slot: int
    offset: int
    shape: tuple[int, ...]


def stack_into(clips: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """(B, F, H, W, 3) uint8 from clips (F, H, W, 3), written into `out` (one copy). Joined
    along frames into `out` seen as (B * F, H, W, 3): `np.stack` would first make a view of
    every clip (a third of the time of the copy)."""
    np.concatenate(clips, out=out.reshape((-1, *out.shape[2:]), copy=False))
    return out


def stacked_shape(clips: list[np.ndarray]) -> tuple[int, ...]:
    return (len(clips), *clips[0].shape)


def slot_bytes(shapes: list[tuple[int, ...]]) -> int:
    """Bytes of a slot holding uint8 arrays of these shapes, one after the other."""
    return sum(_aligned(math.prod(s)) for s in shapes)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class PixelRing:
    """`slots` slots of `size` bytes for each of `workers` workers; made in the main process
    before the workers are forked."""

    def __init__(self, workers: int, slots: int, size: int):
        self.size = _aligned(max(size, 1))
        self.memory = [[mmap.mmap(-1, self.size) for _ in range(slots)] for _ in range(workers)]  # MAP_SHARED
        self._flags = mmap.mmap(-1, workers * slots)
        self.busy = np.frombuffer(self._flags, np.uint8).reshape(workers, slots)
        self._held: set[tuple[int, int]] = set()  # (worker, slot) whose pixels the main process hands out
        self._owner = os.getpid()  # the main process: the only one that frees slots

    def keep_from_later_forks(self) -> None:
        """Leave this ring out of the processes forked from now on (Linux: MADV_DONTFORK; call it
        once its workers are stopped). The caller may still hold batches over its slots, so the
        ring is alive: the workers forked next (with a ring of their own) kept it mapped, and its
        pages resident, for as long as they lived."""
        advice = getattr(mmap, "MADV_DONTFORK", None)
        if advice is not None:
            for m in (*(m for slots in self.memory for m in slots), self._flags):
                m.madvise(advice)

    def put(self, worker: int, batch: dict) -> dict:
        """In worker `worker`: stack the batch's clips into a free slot of its own, or into new
        arrays (sent through the pipe) when none is free."""
        fields = [f for f in PIXEL_FIELDS if f in batch]
        if not fields:
            return batch
        shapes = [stacked_shape(batch[f]) for f in fields]
        free = np.flatnonzero(self.busy[worker] == 0)
        if len(free) == 0 or slot_bytes(shapes) > self.size:
            for field in fields:
                batch[field] = np.stack(batch[field])
            return batch
        slot = int(free[0])
        self.busy[worker, slot] = 1
        memory, offset = np.frombuffer(self.memory[worker][slot], np.uint8), 0
        for field, shape in zip(fields, shapes):
            n = math.prod(shape)
            stack_into(batch[field], memory[offset: offset + n].reshape(shape))
            batch[field] = InSlot(worker, slot, offset, shape)
            offset += _aligned(n)
        return batch

    def take(self, batch: dict, pin: bool) -> dict:
        """In the main process: the batch's pixels as uint8 tensors (B, F, H, W, 3). Over the
        slot itself, which is freed when the last view of it is gone; or, with `pin`, copied
        into pinned memory and the slot freed at once."""
        first = memory = None
        for field in PIXEL_FIELDS:
            where = batch.get(field)
            if isinstance(where, InSlot):
                if first is None:
                    first, memory = where, np.frombuffer(self.memory[where.worker][where.slot], np.uint8)
                view = memory[where.offset: where.offset + math.prod(where.shape)].reshape(where.shape)
                batch[field] = _pinned_copy(view) if pin else torch.from_numpy(view)
            elif isinstance(where, np.ndarray):  # sent through the pipe
                batch[field] = _pinned_copy(where) if pin else torch.from_numpy(where)
        if first is not None:
            if pin:
                self._release(first.worker, first.slot)
            else:  # numpy's export of the slot (memory.base) lives as long as any view of it
                self._held.add((first.worker, first.slot))
                weakref.finalize(memory.base, self._release, first.worker, first.slot).atexit = False
        return batch

    def _release(self, worker: int, slot: int) -> None:
        """Free a slot, in the main process only. A process forked later (a next epoch's worker)
        inherits the finalizers of the views it copied, and its garbage collector may run them:
        it does not map this ring (`keep_from_later_forks`), so writing its flag there was a
        segmentation fault."""
        if os.getpid() != self._owner:
            return
        self._held.discard((worker, slot))
        self.busy[worker, slot] = 0

    def reclaim(self, worker: int) -> None:
        """In the main process, once worker `worker` is dead and every batch it announced was
        taken: free its slots that no batch handed out holds (the one it was writing)."""
        for slot in range(self.busy.shape[1]):
            if (worker, slot) not in self._held:
                self.busy[worker, slot] = 0


def _pinned_copy(array: np.ndarray) -> torch.Tensor:
    """A copy in page-locked memory from PyTorch's caching host allocator (blocks are reused,
    and kept from reuse until the non-blocking copies reading them are done)."""
    out = torch.empty(array.shape, dtype=torch.uint8, pin_memory=True)
    np.copyto(out.numpy(), array)  # numpy: one thread, no contention with the trainer's intra-op pool
    return out
