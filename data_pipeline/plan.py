"""Which sample fills which batch slot of which (rank, worker): a pure function of small state.

Epoch order. Shards are put in a seeded order per epoch and their samples concatenated into
one sequence of N positions; the sequence is cut into blocks of `shuffle_buffer` positions and
each block permuted (seeded). So a worker reads its shards front to back while the samples
of a batch are shuffled, as with webdataset's shuffle buffer, but every position is known
in advance.

Split by node, split by worker. The unseen positions of the epoch, in that order, are cut
into contiguous sample ranges, one per rank (sizes differ by at most one) and within a rank
one per worker, sized by the batches the worker serves: the worker pool takes batch t of a rank
from worker t % num_workers, so worker w serves ceil((K - w) / num_workers) of the rank's K
batches. Ranges, not whole shards, are handed out: any number of shards works for any
world size x workers, and every rank gets exactly K = ceil(M / (world_size x batch_size))
batches. The last batches are padded with repeats of the rank's first positions (marked
invalid) or, with drop_last, the remainder is not served.

Segments. A segment is a stretch of an epoch served with one topology (world size,
workers, batch size, bucket window, drop_last). Its plan depends only on the positions that
were unseen when it started, so the stream state is just (seed, epoch, [(topology, batches
consumed)] per segment): resuming replays it. With an unchanged topology the stream goes on
inside the same plan (identical order); with a changed one the segments before are
replayed to find the unseen positions, and a new plan splits those among the new ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, NamedTuple, Sequence

import numpy as np

Intervals = tuple[tuple[int, int], ...]  # disjoint [start, end) ranges of epoch positions, in order


class Slot(NamedTuple):
    """One sample to read: where it is, whether it is a padding repeat, its random numbers."""

    shard: int  # index into the stream's list of shard paths
    index: int  # sample index inside the shard
    pad: bool
    rand: tuple[float, float, float]  # crop x, crop y, clip start; all in [0, 1)


@dataclass(frozen=True)
class Topology:
    world_size: int
    num_workers: int  # plan workers: max(1, loader worker processes)
    batch_size: int
    window: int  # batches per bucketing window (1 when there is a single bucket)
    drop_last: bool

    def as_list(self) -> list[int]:
        return [self.world_size, self.num_workers, self.batch_size, self.window, int(self.drop_last)]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Topology":
        w, nw, b, win, drop = (int(v) for v in values)
        return cls(w, nw, b, win, bool(drop))

    def worker_share(self, rank_batches: int, worker: int) -> int:
        """How many of a rank's first `rank_batches` batches come from `worker` (round robin)."""
        return max(0, (rank_batches - worker + self.num_workers - 1) // self.num_workers)


def length(iv: Intervals) -> int:
    return sum(b - a for a, b in iv)


def take(iv: Intervals, lo: int, hi: int) -> Intervals:
    """The positions lo..hi-1 of the sequence that `iv` lists, as intervals."""
    out, offset = [], 0
    for a, b in iv:
        n = b - a
        s, e = max(lo - offset, 0), min(hi - offset, n)
        if s < e:
            out.append((a + s, a + e))
        offset += n
        if offset >= hi:
            break
    return tuple(out)


def remove(iv: Intervals, cuts: Sequence[tuple[int, int]]) -> Intervals:
    """`iv` without the positions at sequence indices [lo, hi) for each cut."""
    keep, start = [], 0
    for lo, hi in sorted(c for c in cuts if c[0] < c[1]):
        if lo > start:
            keep.extend(take(iv, start, lo))
        start = max(start, hi)
    keep.extend(take(iv, start, length(iv)))
    merged: list[tuple[int, int]] = []
    for a, b in keep:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass(frozen=True)
class WorkerRange:
    """A worker's share of a segment, in sequence indices of the segment's unseen positions."""

    real: tuple[int, int]  # [lo, hi): the samples it serves
    pads: tuple[tuple[int, int], ...]  # ranges repeated to fill its last batch
    batches: int


@dataclass(frozen=True)
class Segment:
    """The plan of one stretch of an epoch: unseen positions split over ranks and workers."""

    remaining: Intervals
    topo: Topology

    @cached_property
    def size(self) -> int:
        return length(self.remaining)

    @cached_property
    def batches(self) -> int:
        """Batches per rank (the same on every rank)."""
        per_step = self.topo.world_size * self.topo.batch_size
        return self.size // per_step if self.topo.drop_last else -(-self.size // per_step)

    def rank_range(self, rank: int) -> tuple[int, int]:
        t = self.topo
        if t.drop_last:
            n = self.batches * t.batch_size
            return rank * n, (rank + 1) * n
        return rank * self.size // t.world_size, (rank + 1) * self.size // t.world_size

    def worker_range(self, rank: int, worker: int) -> WorkerRange:
        t = self.topo
        lo, hi = self.rank_range(rank)
        real = hi - lo
        before = sum(t.worker_share(self.batches, v) for v in range(worker)) * t.batch_size
        batches = t.worker_share(self.batches, worker)
        slots = batches * t.batch_size
        n_real = max(0, min(slots, real - before))
        start = lo + min(before, real)
        first_pad = max(0, before - real)  # pads are the rank's positions lo, lo+1, ... (wrapping)
        return WorkerRange((start, start + n_real), self._wrap(lo + first_pad, slots - n_real), batches)

    def _wrap(self, start: int, count: int) -> tuple[tuple[int, int], ...]:
        out, s = [], start % max(self.size, 1)
        while count > 0 and self.size > 0:
            n = min(count, self.size - s)
            out.append((s, s + n))
            count, s = count - n, 0
        return tuple(out)

    def consumed(self, rank_batches: int) -> list[tuple[int, int]]:
        """Sequence ranges served once every rank took `rank_batches` batches.

        Inside a bucketing window the served samples depend on the data, so a window counts
        as served only when all its batches were taken (the rest is served again after a
        topology change)."""
        t = self.topo
        cuts = []
        for rank in range(t.world_size):
            for worker in range(t.num_workers):
                r = self.worker_range(rank, worker)
                share = t.worker_share(rank_batches, worker)
                done = share if share >= r.batches else share // t.window * t.window
                cuts.append((r.real[0], min(r.real[1], r.real[0] + done * t.batch_size)))
        return cuts


def replay(num_samples: int, closed: Sequence[tuple[Topology, int]]) -> Intervals:
    """The unseen positions after closed segments, each (topology, batches consumed per rank)."""
    iv: Intervals = ((0, num_samples),) if num_samples else ()
    for topo, consumed in closed:
        iv = remove(iv, Segment(iv, topo).consumed(consumed))
    return iv


class EpochOrder:
    """The seeded order of an epoch: shard order, then a permutation inside each block."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int, block: int):
        self.seed, self.epoch, self.block = seed, epoch, block
        rng = np.random.default_rng([seed, epoch, 0])
        self.shard_order = rng.permutation(len(counts))
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64)[self.shard_order])])
        self.size = int(self.starts[-1])

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.block, self.size - b * self.block)
        perm = np.random.default_rng([self.seed, self.epoch, 1, b]).permutation(n)
        rand = np.random.default_rng([self.seed, self.epoch, 2, b]).random((n, 3))
        return perm, rand

    def read_blocks(self, iv: Intervals, pad: bool) -> Iterator[list[Slot]]:
        """Slots for the positions in `iv`, in order, grouped by shuffle block (a read unit)."""
        for lo, hi in iv:
            for b in range(lo // self.block, (hi - 1) // self.block + 1):
                a, z = max(lo, b * self.block), min(hi, (b + 1) * self.block)
                perm, rand = self._block(b)
                offsets = np.arange(a - b * self.block, z - b * self.block)
                raw = b * self.block + perm[offsets]
                j = np.searchsorted(self.starts, raw, side="right") - 1
                yield _slots(self.shard_order[j], raw - self.starts[j], pad, rand[offsets])


def _slots(shards: np.ndarray, indices: np.ndarray, pad: bool, rand: np.ndarray) -> list[Slot]:
    return [Slot(int(s), int(i), pad, (float(r[0]), float(r[1]), float(r[2])))
            for s, i, r in zip(shards.tolist(), indices.tolist(), rand)]


def epoch_read_blocks(order: EpochOrder, segment: Segment, rank: int, worker: int,
                      skip_slots: int) -> Iterator[list[Slot]]:
    """A worker's slots in a segment after its first `skip_slots`, grouped into read units."""
    r = segment.worker_range(rank, worker)
    lo = r.real[0] + min(skip_slots, r.real[1] - r.real[0])
    yield from order.read_blocks(take(segment.remaining, lo, r.real[1]), pad=False)
    skip = max(0, skip_slots - (r.real[1] - r.real[0]))
    for a, b in r.pads:
        if b - a <= skip:
            skip -= b - a
            continue
        yield from order.read_blocks(take(segment.remaining, a + skip, b), pad=True)
        skip = 0


@dataclass(frozen=True)
class ResampledOrder:
    """Infinite weighted draws: each visit is a random run of `visit` samples of one source.

    Visit i of (segment, rank, worker) depends only on its seed, so a resumed stream can jump
    to any slot without reading what came before."""

    source_starts: tuple[int, ...]  # first shard id of each source
    source_counts: tuple[tuple[int, ...], ...]  # samples per shard, per source
    weights: tuple[float, ...]
    seed: int
    segment: int
    visit: int

    def visit_slots(self, rank: int, worker: int, i: int) -> list[Slot]:
        rng = np.random.default_rng([self.seed, 3, self.segment, rank, worker, i])
        p = np.asarray(self.weights) / sum(self.weights)
        d = int(rng.choice(len(p), p=p))
        starts = np.concatenate([[0], np.cumsum(self.source_counts[d])])
        raw = (int(rng.integers(starts[-1])) + rng.permutation(self.visit)) % starts[-1]
        j = np.searchsorted(starts, raw, side="right") - 1
        return _slots(self.source_starts[d] + j, raw - starts[j], False, rng.random((self.visit, 3)))

    def read_blocks(self, rank: int, worker: int, skip_slots: int) -> Iterator[list[Slot]]:
        i, offset = divmod(skip_slots, self.visit)
        while True:
            yield self.visit_slots(rank, worker, i)[offset:]
            i, offset = i + 1, 0
