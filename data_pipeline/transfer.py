"""Batch pixels from the loader workers to the main process through reused shared memory.

A loader worker (workers.py) that pickled its batch through its pipe of 64 KiB to the main
process: a uint8 batch of 32 x 128 x 128 x 3 (1.5 MB) took ~25 writes, as many wake-ups of both
processes and four copies (pickle, pipe in, pipe out, unpickle), measured at more CPU than
decoding the batch's JPEGs. torch's own tensor sharing would make a new shared-memory file
per batch (created, zero-filled, mapped twice, in /dev/shm: 64 MB by default in Docker).

Here the main process maps, before the workers are forked, a few slots per worker: anonymous
shared memory (nothing in /dev/shm), one mapping per slot. A worker writes a batch's pixels
straight into a free slot of its own (`allocate`: collate decodes the images there, see
stages.py) and sends only where they lie (`put`); the main process hands
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

PIXEL_FIELDS = ("__pixels__", "__pixels_sr__")  # uint8 (B, F, H, W, 3)
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


def new_arrays(shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """uint8 arrays of these shapes, in this process's own memory."""
    return [np.empty(shape, np.uint8) for shape in shapes]


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
        self._placed: dict[int, list] = {}  # in a worker: its last allocation, (array, InSlot) per field
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

    def allocate(self, worker: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """In worker `worker`: uint8 arrays of these shapes (a batch's pixel fields), one after
        the other in a free slot of its own, or new arrays (sent through the pipe) when none is
        free."""
        free = np.flatnonzero(self.busy[worker] == 0)
        if len(free) == 0 or slot_bytes(shapes) > self.size:
            return new_arrays(shapes)
        slot = int(free[0])
        self.busy[worker, slot] = 1
        memory, offset, placed = np.frombuffer(self.memory[worker][slot], np.uint8), 0, []
        for shape in shapes:
            n = math.prod(shape)
            placed.append((memory[offset: offset + n].reshape(shape), InSlot(worker, slot, offset, shape)))
            offset += _aligned(n)
        self._placed[worker] = placed
        return [array for array, _ in placed]

    def put(self, worker: int, batch: dict) -> dict:
        """In worker `worker`: the batch with its pixel arrays that lie in the slot of its last
        `allocate` replaced by where they lie (others go through the pipe as they are)."""
        for array, where in self._placed.pop(worker, []):
            for field in PIXEL_FIELDS:
                if batch.get(field) is array:
                    batch[field] = where
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
