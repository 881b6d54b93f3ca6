"""Which sample fills which batch slot of which (rank, worker): a pure function of small state.

Epoch order. Shards are put in a seeded order per epoch and their samples concatenated into
one sequence of N positions; the sequence is cut into blocks of `shuffle_buffer` positions and
each block permuted (seeded). So a worker reads its shards front to back while the samples
of a batch are shuffled, as with webdataset's shuffle buffer, but every position is known
in advance.

Split by step, then by rank and worker. The unseen positions of the epoch, in that order, are
cut into rows of batch_size positions: row i is batch t = i // world_size of rank i % world_size,
and the worker pool takes batch t of a rank from worker t % num_workers. So grad_accum
micro-batches of world_size ranks consume the positions [k G, (k + 1) G) in optimizer step k,
G = world_size x batch_size x grad_accum the global batch, whatever the split of G into ranks,
micro-batches and workers: a run resumed on another layout trains each step on the samples the
uninterrupted run did (per-sample noise in trainer/diffusion/noise.py does the rest). This
holds for one bucket (window 1); with aspect-ratio buckets a worker regroups the samples of
`window` of its batches by bucket, which mixes the steps those batches belong to.
Every rank gets exactly K = ceil(M / G) x grad_accum batches, a whole number of optimizer
steps (`step_rows`, grad_accum micro-batches); the last rows are padded with repeats of the
segment's first positions (marked invalid) or, with drop_last, the remainder is not served. So
an epoch ends with a step in every layout of the same G: rounded to rows alone, the step that
ends an epoch took the next epoch's first rows where a layout's rows per rank were not a whole
number of steps, and every later step held other samples than the uninterrupted run's. A worker reads a stripe of every shuffle block (each block's share at
once, in file order), not a contiguous range: any number of shards works for any topology.

Segments. A segment is a stretch of an epoch served with one topology (world size,
workers, batch size, bucket window, drop_last, micro-batches per step). Its plan depends only on the positions that
were unseen when it started, so the stream state is just (seed, epoch, [(topology, batches
consumed, ids served of windows left open)] per segment): resuming replays it. (Which
samples the batches handed out of an unfinished bucket window took depends on the data; the
ids say it, at most workers x (window - 1) x batch_size per rank.) With an unchanged topology the stream goes on
inside the same plan (identical order); with a changed one the segments before are
replayed to find the unseen positions, and a new plan splits those among the new ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Collection, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from numpy.random import default_rng  # imported here, before workers fork: numpy loads it lazily

Intervals = tuple[tuple[int, int], ...]  # disjoint [start, end) ranges of epoch positions, in order


class Slot(NamedTuple):
    """One sample to read: where it is, whether it is a padding repeat, its random numbers."""

    shard: int  # index into the stream's list of shard paths
    index: int  # sample index inside the shard
    pad: bool
    rand: tuple[float, float, float]  # crop x, crop y, clip start; all in [0, 1)
    sample: int = -1  # the sample's id: samples in the shards before it, plus index


@dataclass(frozen=True)
class Topology:
    world_size: int
    num_workers: int  # plan workers: max(1, loader worker processes)
    batch_size: int
    window: int  # batches per bucketing window (1 when there is a single bucket)
    drop_last: bool
    step_rows: int = 1  # a rank's batches per optimizer step (grad_accum): an epoch is whole steps

    def as_list(self) -> list[int]:
        return [self.world_size, self.num_workers, self.batch_size, self.window, int(self.drop_last), self.step_rows]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "Topology":
        w, nw, b, win, drop, rows = (int(v) for v in values)
        return cls(w, nw, b, win, bool(drop), rows)

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
class Segment:
    """The plan of one stretch of an epoch: unseen positions split over ranks and workers, row
    by row (see the module docstring). Indices are of the sequence of unseen positions."""

    remaining: Intervals
    topo: Topology

    @cached_property
    def size(self) -> int:
        return length(self.remaining)

    @cached_property
    def batches(self) -> int:
        """Batches per rank (the same on every rank): whole optimizer steps."""
        t = self.topo
        per_step = t.world_size * t.batch_size * t.step_rows
        steps = self.size // per_step if t.drop_last else -(-self.size // per_step)
        return steps * t.step_rows

    @cached_property
    def real_end(self) -> int:
        """Indices below it are served as themselves, at and above it as padding repeats."""
        t = self.topo
        return self.batches * t.world_size * t.batch_size if t.drop_last else self.size

    def worker_batches(self, worker: int) -> range:
        """The rank batches a worker serves (the same on every rank): t = worker (mod workers)."""
        return range(worker, self.batches, self.topo.num_workers)

    def batch_slots(self, rank: int, batch: int) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
        """Batch `batch` of `rank`: its real indices [lo, hi) and the padding that fills it."""
        t = self.topo
        lo = (batch * t.world_size + rank) * t.batch_size
        hi = min(lo + t.batch_size, self.real_end)
        real = (lo, max(lo, hi))
        return real, self._wrap(max(lo, hi), t.batch_size - (real[1] - real[0]))

    def _wrap(self, start: int, count: int) -> tuple[tuple[int, int], ...]:
        out, s = [], start % max(self.size, 1)
        while count > 0 and self.size > 0:
            n = min(count, self.size - s)
            out.append((s, s + n))
            count, s = count - n, 0
        return tuple(out)

    def open_window(self, worker: int, rank_batches: int) -> range:
        """The batches of `worker`'s window that is open (partly served) once every rank took
        `rank_batches` batches; empty when none is."""
        t, mine = self.topo, self.worker_batches(worker)
        share = t.worker_share(rank_batches, worker)
        if share >= len(mine) or share % t.window == 0:
            return range(0)
        start = share // t.window * t.window
        return mine[start: start + t.window]

    def open_span(self, rank_batches: int) -> tuple[int, int]:
        """Index range [lo, hi) holding every rank's open windows; (0, 0) when none is."""
        windows = [w for w in (self.open_window(k, rank_batches) for k in range(self.topo.num_workers)) if w]
        if not windows:
            return 0, 0
        row = self.topo.world_size * self.topo.batch_size  # one batch of every rank
        return min(w[0] for w in windows) * row, min((max(w[-1] for w in windows) + 1) * row, self.real_end)

    def positions(self, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
        """The epoch positions at index ranges [lo, hi), in order (int64)."""
        parts = [np.arange(a, b, dtype=np.int64) for lo, hi in ranges for a, b in take(self.remaining, lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def handed_positions(self, order: "EpochOrder", rank_batches: int, ids: Collection[int]) -> np.ndarray:
        """The epoch positions of open windows (`open_span`) that hold one of the sample `ids`:
        what the batches handed out of those windows took (sorted)."""
        positions = self.positions([self.open_span(rank_batches)])
        return positions[np.isin(order.ids(positions), np.fromiter(ids, dtype=np.int64, count=len(ids)))]

    def consumed(self, rank_batches: int) -> list[tuple[int, int]]:
        """Index ranges served once every rank took `rank_batches` batches.

        Inside a bucketing window the served samples depend on the data, so a window counts
        as served only when all its batches were taken (the rest is served again after a
        topology change). Without windows this is the prefix of rank_batches rows of ranks."""
        t = self.topo
        mines = [self.worker_batches(w) for w in range(t.num_workers)]
        served = []  # per worker: the batches counted as served
        for worker, mine in enumerate(mines):
            share = t.worker_share(rank_batches, worker)
            served.append(mine[: share if share >= len(mine) else share // t.window * t.window])
        first = min((mine[len(done)] for mine, done in zip(mines, served) if len(done) < len(mine)),
                    default=self.batches)  # every batch before it is served, on every worker
        later = [b for w, done in enumerate(served) for b in done[len(range(w, first, t.num_workers)):]]
        row = t.world_size * t.batch_size  # one batch of every rank
        return [(lo * row, min(hi * row, self.real_end)) for lo, hi in [(0, first)] + [(b, b + 1) for b in later]]


def subtract(iv: Intervals, positions: np.ndarray) -> Intervals:
    """`iv` without the epoch `positions` (sorted; those outside `iv` change nothing)."""
    out = []
    for a, b in iv:
        start = a
        for p in positions[np.searchsorted(positions, a): np.searchsorted(positions, b)].tolist():
            if p > start:
                out.append((start, p))
            start = p + 1
        if b > start:
            out.append((start, b))
    return tuple(out)


def replay(num_samples: int, closed: Sequence[tuple[Topology, int]], served: Sequence[Collection[int]] = (),
           order: Optional["EpochOrder"] = None) -> Intervals:
    """The unseen positions after closed segments, each (topology, batches consumed per rank).

    `served[i]`, where given, holds the ids of the samples handed out of the windows segment i
    left open (every rank's): `consumed` cannot know them (a window's grouping depends on the
    data), so their positions, found through the epoch's `order`, are removed as well."""
    iv: Intervals = ((0, num_samples),) if num_samples else ()
    for i, (topo, consumed) in enumerate(closed):
        segment = Segment(iv, topo)
        iv = remove(iv, segment.consumed(consumed))
        if i < len(served) and served[i]:
            iv = subtract(iv, segment.handed_positions(order, consumed, served[i]))
    return iv


class EpochOrder:
    """The seeded order of an epoch: shard order, then a permutation inside each block."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int, block: int):
        self.seed, self.epoch, self.block = seed, epoch, block
        rng = default_rng([seed, epoch, 0])
        self.shard_order = rng.permutation(len(counts))
        counts = np.asarray(counts, dtype=np.int64)
        self.first_id = np.concatenate([[0], np.cumsum(counts)])[:-1]  # sample id of each shard's sample 0
        self.starts = np.concatenate([[0], np.cumsum(counts[self.shard_order])])
        self.size = int(self.starts[-1])

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.block, self.size - b * self.block)
        perm = default_rng([self.seed, self.epoch, 1, b]).permutation(n)
        rand = default_rng([self.seed, self.epoch, 2, b]).random((n, 3))
        return perm, rand

    def read_blocks(self, iv: Iterable[tuple[int, int]], pad: bool) -> Iterator[list[Slot]]:
        """Slots for the positions in `iv`, in order, grouped by shuffle block (a read unit):
        the pieces of consecutive intervals inside one block are read together."""
        block, parts = -1, []
        for lo, hi in iv:
            for b in range(lo // self.block, (hi - 1) // self.block + 1):
                if b != block and parts:
                    yield self._unit(block, parts, pad)
                    parts = []
                block = b
                parts.append(np.arange(max(lo, b * self.block), min(hi, (b + 1) * self.block)) - b * self.block)
        if parts:
            yield self._unit(block, parts, pad)

    def _unit(self, b: int, parts: list[np.ndarray], pad: bool) -> list[Slot]:
        perm, rand = self._block(b)
        offsets = np.concatenate(parts)
        shards, indices = self._located(b * self.block + perm[offsets])
        return _slots(shards, indices, self.first_id[shards] + indices, pad, rand[offsets])

    def _located(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index in shard) of positions in the concatenation of the ordered shards."""
        j = np.searchsorted(self.starts, raw, side="right") - 1
        return self.shard_order[j], raw - self.starts[j]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """The sample id at each epoch position (int64 array, as `positions`)."""
        raw = np.empty(len(positions), dtype=np.int64)
        blocks = positions // self.block
        for b in np.unique(blocks).tolist():
            at = blocks == b
            raw[at] = b * self.block + self._block(b)[0][positions[at] - b * self.block]
        shards, indices = self._located(raw)
        return self.first_id[shards] + indices


def _slots(shards: np.ndarray, indices: np.ndarray, ids: np.ndarray, pad: bool, rand: np.ndarray) -> list[Slot]:
    return [Slot(int(s), int(i), pad, (float(r[0]), float(r[1]), float(r[2])), int(n))
            for s, i, n, r in zip(shards.tolist(), indices.tolist(), ids.tolist(), rand)]


def epoch_read_blocks(order: EpochOrder, segment: Segment, rank: int, worker: int,
                      skip_slots: int) -> Iterator[list[Slot]]:
    """A worker's slots in a segment after its first `skip_slots` (whole batches), grouped into
    read units: the real samples of its batches, then the padding repeats (only the last rows
    have any)."""
    batches = segment.worker_batches(worker)[skip_slots // segment.topo.batch_size:]
    spans = [segment.batch_slots(rank, b) for b in batches]

    def positions(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        for lo, hi in ranges:
            yield from take(segment.remaining, lo, hi)

    yield from order.read_blocks(positions(real for real, _ in spans if real[0] < real[1]), pad=False)
    yield from order.read_blocks(positions(p for _, pads in spans for p in pads), pad=True)


@dataclass(frozen=True)
class ResampledOrder:
    """Infinite weighted draws: each visit is a random run of `visit` samples of one source.

    Visit i of (segment, rank, worker) depends only on its seed, so a resumed stream can jump
    to any slot without reading what came before. Each draw has an id of its own (a random
    62-bit number, not its sample's): ids key a sample's noise, timestep and CFG dropout
    (trainer/diffusion/noise.py), and a source smaller than a visit repeats its samples in it,
    often within a batch, where copies under one id were the same training term twice."""

    source_starts: tuple[int, ...]  # first shard id of each source
    source_counts: tuple[tuple[int, ...], ...]  # samples per shard, per source
    weights: tuple[float, ...]
    seed: int
    segment: int
    visit: int

    def visit_slots(self, rank: int, worker: int, i: int) -> list[Slot]:
        rng = default_rng([self.seed, 3, self.segment, rank, worker, i])
        p = np.asarray(self.weights) / sum(self.weights)
        d = int(rng.choice(len(p), p=p))
        starts = np.concatenate([[0], np.cumsum(self.source_counts[d])])
        raw = (int(rng.integers(starts[-1])) + rng.permutation(self.visit)) % starts[-1]
        j = np.searchsorted(starts, raw, side="right") - 1
        rand = rng.random((self.visit, 3))
        return _slots(self.source_starts[d] + j, raw - starts[j], rng.integers(1 << 62, size=self.visit), False, rand)

    def read_blocks(self, rank: int, worker: int, skip_slots: int) -> Iterator[list[Slot]]:
        i, offset = divmod(skip_slots, self.visit)
        while True:
            yield self.visit_slots(rank, worker, i)[offset:]
            i, offset = i + 1, 0
