"""The streaming loader: exactly-once, resumable, equal-length batches for one rank.

The pipeline, as an explicit list of stages (in the spirit of open_clip's `data.py`):

    shard list        manifests -> shard paths + sample counts         Stream.__init__
    seeded shuffle    per epoch: shard order, then block permutations  plan.EpochOrder
    split by step     row i of batch_size positions is batch i // W    plan.Segment.batch_slots
    and by rank       of rank i % W: a step's positions on any layout
    split by worker   batch t of a rank from worker t % workers        plan.Segment.worker_batches
    tar to samples    seek to the planned samples of each shard        stages.read_stage
    safe decode       allowlisted decoders, pickles rejected           stages.decode_stage
    transforms        buckets (a JPEG's from its header), video       stages.transform_stage
                      clips, resize + crop, SR pairs
    batch             one bucket per batch, a fixed number per worker  stages.batch_stage
    collate           JPEGs decoded (resized, cropped) into the        stages.collate_stage
                      batch's memory: a shared slot (transfer.py)
    hand over         forked workers in turn (workers.py), uint8      WorkerPool, PixelRing,
                      pixels where they were written                   finalize
    to the device     (the trainer) copy, then x / 127.5 - 1 there     batch_to_device

The first four stages are arithmetic on sample counts (see plan.py); workers then read
only what they were assigned. Pixels stay uint8 up to the device, channels last as they
were decoded: a quarter of the bytes of float32 to move and no per-pixel work in the main
process (when CUDA is there, one copy into pinned memory for the non-blocking transfer).
The stream is infinite over epochs; `state_dict()` says what was handed to the caller (not
what workers prefetched) and a stream built from it goes on with exactly the samples not
yet seen, also after the number of ranks or workers changed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import mmap
import os
import signal
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import torch

from data_pipeline.config import DataConfig, remote_options, validate_data_config
from data_pipeline.errors import DataError, SkipCounter, check_error_budget, empty_counts
from data_pipeline.manifest import (Manifest, cascade_pairs_mismatch, check_pixel_settings, latent_shapes_mismatch,
                                    resolve_source, resolve_sources)
from data_pipeline.plan import (EpochOrder, ResampledOrder, Segment, Slot, Topology, epoch_read_blocks, length,
                                 replay)
from data_pipeline.progress import PROGRESS, track
from data_pipeline.remote import RemoteOptions, redact
from data_pipeline.shard_cache import Recorded
from data_pipeline.stages import (PIXELS, READING, Allocate, Lost, batch_stage, begin, collate_stage,
                                  decode_stage, read_stage, transform_stage)
from data_pipeline.tar_reader import ShardReader
from data_pipeline.transfer import FORK, PixelRing, new_arrays, slot_bytes
from data_pipeline.transforms import TransformSpec
from data_pipeline.workers import Producer, Watch, WorkerDied, WorkerPool, wait_with_parent

log = logging.getLogger("data_pipeline")
STATE_VERSION = 2  # 2: JPEGs bucketed by their header, whatever their decoding gives (see load_state_dict)
MARK_FIELDS = 4  # a worker's sample mark: shard, index, phase, progress count (SampleMarks)
SEGMENT_FIELDS = 7  # a segment of the state: Topology.as_list() and the batches consumed per rank
# what a native library's fault kills a process with (not SIGKILL: a person, or the OOM killer)
CRASH_SIGNALS = frozenset((signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT))
CRASH_RESTARTS = 8  # workers forked again after a crash, per rank and segment; the next crash ends the run


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class RankJob:
    """What the workers of one rank need to serve one segment; sent to each worker process."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    spec: TransformSpec
    topo: Topology
    rank: int
    consumed: int  # batches of this rank already handed out in this segment
    seed: int
    epoch: int
    shuffle_buffer: int
    segment: Optional[Segment]  # epoch mode
    resampled: Optional[ResampledOrder]  # resampled mode
    budget: float
    min_samples: int
    max_logged: int
    offsets: tuple[list[int], ...] = ()  # byte index per shard ([] where none)
    remote: RemoteOptions = RemoteOptions()
    crashed: frozenset = frozenset()  # (shard, index, phase, reason) of samples a worker died or stalled on
    #   (stages.PIXELS: decoding their pixels, then skipped there; else reading or opening them: skipped unread)
    recorded: tuple[Recorded, ...] = ()  # the manifests' size and sha256 per shard: a remote shard of another is refused
    restarted: bool = False  # forked again in place of a worker that died: it sent the counts of the window it was in

    def crashed_in(self, phase: int) -> Lost:
        """(shard, index) -> skip reason of the samples a worker died or stalled on in this phase."""
        return {(shard, index): reason for shard, index, p, reason in self.crashed if p == phase}

    def worker_batches(self, worker: int) -> Optional[int]:
        """Batches a worker serves in the segment; None when infinite (resampled)."""
        return None if self.segment is None else len(self.segment.worker_batches(worker))

    def read_blocks(self, worker: int, skip_slots: int) -> Iterator[list[Slot]]:
        if self.resampled is not None:
            return self.resampled.read_blocks(self.rank, worker, skip_slots)
        order = EpochOrder(self.counts, self.seed, self.epoch, self.shuffle_buffer)
        return epoch_read_blocks(order, self.segment, self.rank, worker, skip_slots)


def worker_stream(job: RankJob, worker: int, mark: Optional[memoryview] = None,
                  allocate: Allocate = new_arrays) -> Iterator[dict]:
    """The batches of one worker from where its rank stopped: the stages, in order (`mark`:
    see `SampleMarks`), pixels written into memory from `allocate`. The batches of a window
    that were handed out already are grouped again but not collated: nothing of them decoded."""
    t = job.topo
    taken = t.worker_share(job.consumed, worker)
    total = job.worker_batches(worker)
    if total is not None and taken >= total:
        return
    first = taken // t.window * t.window  # restart at the window holding the next batch
    counter = SkipCounter(job.budget, job.min_samples, job.max_logged, f"rank {job.rank} worker {worker}")
    reader = ShardReader(list(job.paths), offsets=list(job.offsets) or None, options=job.remote,
                         recorded=list(job.recorded) or None)
    try:
        blocks = job.read_blocks(worker, first * t.batch_size)
        items = read_stage(blocks, reader, job.paths, counter, mark, job.crashed_in(READING))
        items = decode_stage(items, counter)
        items = transform_stage(items, job.spec, counter, defer=True)
        groups = islice(batch_stage(items, t.batch_size, t.window), taken - first, None)
        if job.restarted and taken > first:
            groups = _counted_already(groups, counter)
        for batch in collate_stage(groups, allocate, counter, mark, job.crashed_in(PIXELS)):
            batch["__meta__"] = {"worker": worker, "stats": counter.take_delta()}
            yield batch
    finally:
        reader.close()


def _counted_already(groups: Iterator, counter: SkipCounter) -> Iterator:
    """The batches of a window a restarted worker read again, without the counts of that
    reading (reads, skips): the worker it replaces sent them with the first batch of the
    window, which was handed out."""
    first = next(groups, None)  # reads the window
    counter.take_delta()
    if first is not None:
        yield first
        yield from groups


class SampleMarks:
    """Per worker process, the (shard, index, phase) of the sample it last began and a count of
    its progress, in shared memory mapped before the workers are forked: each worker sets its
    three integers as it reads a sample (`stages.READING`) and as it decodes its pixels
    (`stages.PIXELS`), bumping the count then, at each read of a block's samples and at each
    block read from a remote store or downloaded (progress.py), and the main process reads them
    when a worker dies without a word, or stands still (workers.Watch). A
    decoder that crashes (or hangs) on a damaged file (a segmentation fault in a native
    library) kills (or holds) the worker, and a run resumed from its checkpoint meets the same
    sample again: the error names it."""

    def __init__(self, workers: int):
        self._memory = mmap.mmap(-1, 8 * MARK_FIELDS * max(workers, 1))  # MAP_SHARED
        self._marks = memoryview(self._memory).cast("q")
        for k in range(len(self._marks)):
            self._marks[k] = -1

    def of(self, worker: int) -> memoryview:
        return self._marks[MARK_FIELDS * worker: MARK_FIELDS * (worker + 1)]

    def progress(self, worker: int) -> int:
        return self._marks[MARK_FIELDS * worker + PROGRESS]

    def describe(self, worker: int, paths: tuple[str, ...]) -> str:
        shard, index = self.of(worker)[:2]
        if shard < 0:
            return "; it had begun no sample"
        return (f"; the last sample it began is #{index} of {redact(paths[shard])}: if a decoder crashed on it, "
                f"remove that sample (or its shard) from the dataset")


class _Recovery:
    """How a rank's worker pool recovers in one segment: a worker killed by a crash signal (or
    by the pool, stalled: workers.Watch) is forked again from the batch it owes, past the sample
    it was on (none between two batches), which is skipped from then on; once per sample,
    `CRASH_RESTARTS` times, and not where other processes read the same batches (`Stream`'s
    skip_unreadable=False: a crash need not be the data's, and skipped on one process alone it
    would shift its batches). A sample it died reading or opening is skipped unread, so not
    inside a bucket window it may have served batches of (the window's grouping would change
    under them); one it died decoding the pixels of is grouped again as before (by its header)
    and skipped when its batch is collated, and a death between two batches skips nothing: the
    window's batches stay as they were, so those restarts may fall inside a window."""

    def __init__(self, job: RankJob, ring: PixelRing, marks: SampleMarks, rotation: int,
                 crashed: set[tuple[int, int, int, str]]):
        self.job, self.ring, self.marks, self.rotation, self.crashed = job, ring, marks, rotation, crashed
        self.restarts: list[tuple[int, int]] = []  # the (shard, index) each restarted worker had died on

    def restart(self, died: WorkerDied, handed: int) -> Optional[RankJob]:
        """The job to fork pool worker `died.worker` again with, `handed` batches of the segment
        handed out; None where it is not to be forked again."""
        job, (shard, index, phase, _) = self.job, self.marks.of(died.worker)
        worker = (died.worker + self.rotation) % job.topo.num_workers
        owed = job.topo.worker_share(job.consumed + handed, worker)  # batches it has handed out
        regrouped = shard < 0 or phase == PIXELS  # nothing skipped unread: its window's batches come out as before
        if not (died.stalled or died.signal in CRASH_SIGNALS) or len(self.restarts) >= CRASH_RESTARTS or \
                (shard, index) in self.restarts or (owed % job.topo.window and not regrouped):
            return None
        how = (f"made no progress for {died.stalled:.0f} s (killed)" if died.stalled
               else f"died of {signal.Signals(died.signal).name}")
        if not job.remote.skip_unreadable:  # other processes read this rank's batches
            log.warning("loader worker %d %s; not forked past the sample it was on: the other ranks of this "
                        "replica (pipeline stages, a sequence group) read the same batches, each from its own "
                        "loader, and would not skip it", died.worker, how)
            return None
        self.restarts.append((shard, index))
        reason = "stalled_decoder" if died.stalled else "crashed_decoder"
        if shard < 0:
            log.warning("loader worker %d %s between two batches; forked again", died.worker, how)
        else:
            log.warning("loader worker %d %s on sample #%d of %s (a decoder %s on it?): skipped as %s, the worker "
                        "forked again past it; remove that sample from the dataset", died.worker, how, index,
                        redact(job.paths[shard]), "hung" if died.stalled else "crashed", reason)
            self.crashed.add((shard, index, phase, reason))
        self.ring.reclaim(died.worker)
        return dataclasses.replace(job, consumed=job.consumed + handed, crashed=frozenset(self.crashed), restarted=True)


def _rank_producer(job: RankJob, ring: PixelRing, marks: SampleMarks, rotation: int) -> Producer:
    """Pool worker j serves plan worker (j + rotation) % workers, rotation = batches consumed
    when the pool started: the rank's next batch came from pool worker 0, whichever plan worker
    owed it. Pixels go into worker j's slots of the ring; the sample it is on, into its marks."""

    def produce(j: int) -> Iterator[dict]:
        mark = marks.of(j)
        track(mark)  # the remote reads and downloads under the stages count on it too
        allocate = functools.partial(ring.allocate, j)
        for batch in worker_stream(job, (j + rotation) % job.topo.num_workers, mark, allocate):
            batch = ring.put(j, batch)
            begin(mark, -1, -1, READING)  # the batch is done: until the next sample begins, none is in the works
            yield batch

    return produce


SEGMENT_END = "__segment_end__"  # what a worker sends once it has served its batches of a segment
# the fields of a RankJob that change from one segment to the next (the rest is the stream's own)
PER_SEGMENT = ("consumed", "seed", "epoch", "shuffle_buffer", "segment", "resampled", "crashed")


@dataclass
class _Serve:
    """The producer of a rank's persistent workers (`_Workers`): worker j waits on its job pipe
    for a segment (the per-segment fields of its RankJob and the rotation), serves it, says
    SEGMENT_END, and waits for the next. Inherited by the fork, not pickled: only each
    segment's few fields cross the pipe (a job's paths and byte offsets can be large)."""

    base: RankJob  # the stream's own fields; the per-segment ones come with each segment
    ring: PixelRing
    marks: SampleMarks
    jobs: list  # per worker: (its reading end, the main process's writing end) of a pipe

    def __call__(self, j: int) -> Iterator[dict]:
        reading, parent = self.jobs[j][0], os.getppid()
        while wait_with_parent(reading.poll, parent):
            fields, rotation = reading.recv()
            yield from self.segment(dataclasses.replace(self.base, **fields), rotation, j)

    def segment(self, job: RankJob, rotation: int, j: int) -> Iterator[dict]:
        yield from _rank_producer(job, self.ring, self.marks, rotation)(j)
        yield {SEGMENT_END: True}


@dataclass
class _Serving:
    """The segment a rank's persistent workers serve: how to recover a worker in it, and the
    pool's count of handed-out messages (`WorkerPool.handed`) when it began."""

    recovery: Optional[_Recovery] = None
    start: int = 0


def _recover(serve: _Serve, segment: _Serving, died: WorkerDied, handed: int) -> Optional[Producer]:
    """`recover` of a persistent pool: the replacement finishes the segment from the batch the
    dead worker owed, then serves the later segments as the others do."""
    restarted = segment.recovery.restart(died, handed - segment.start) if segment.recovery else None
    if restarted is None:
        return None
    rotation = segment.recovery.rotation

    def produce(j: int) -> Iterator[dict]:
        reading = serve.jobs[j][0]
        while reading.poll(0):  # the segment's fields, where the dead worker had not read them yet
            reading.recv()
        yield from serve.segment(restarted, rotation, j)
        yield from serve(j)

    return produce


class _Workers:
    """A rank's loader workers, forked once and serving segment after segment (epochs, and the
    stretches a resume splits them into); see `Stream.start_workers`. Their pixel ring and
    sample marks are made before the fork, one for all segments."""

    def __init__(self, base: RankJob, cfg: DataConfig, slot_size: int):
        n = cfg.num_workers
        # slots: the batches in flight (prefetch_factor + 1) and the one the caller holds
        self.ring = PixelRing(n, cfg.prefetch_factor + 2, slot_size)
        self.marks = SampleMarks(n)
        self.serve = _Serve(base, self.ring, self.marks, [FORK.Pipe(duplex=False) for _ in range(n)])
        self.current = _Serving()
        watch = Watch(self.marks.progress, cfg.stall_timeout_s) if cfg.stall_timeout_s else None
        self.pool = WorkerPool(self.serve, n, cfg.prefetch_factor,
                               functools.partial(_recover, self.serve, self.current), watch)
        self.messages = iter(self.pool)  # every batch and SEGMENT_END of every segment, in turn
        self.busy = False  # a segment is being served

    def batches(self, job: RankJob, crashed: set[tuple[int, int, int, str]], pin: bool) -> Iterator[dict]:
        """The segment's batches, pixels as tensors over their slots. Batch t comes from the
        pool's worker in turn; pool worker j serves plan worker (j + rotation) % workers, so the
        worker whose turn it is serves the rank's next batch. Once the last batch is out, every
        worker's next message is its SEGMENT_END (batch counts of plan workers differ by at most
        one, the larger ones first)."""
        base, n = self.serve.base, len(self.serve.jobs)
        if any(getattr(job, f.name) != getattr(base, f.name) for f in dataclasses.fields(RankJob)
               if f.name not in PER_SEGMENT):
            raise DataError("internal: a segment's job differs from its stream's in more than the per-segment fields")
        rotation = (job.consumed - self.pool.handed) % n
        self.current.recovery = _Recovery(job, self.ring, self.marks, rotation, crashed)
        self.current.start = self.pool.handed
        self.busy = True
        for _, writing in self.serve.jobs:
            writing.send(({f: getattr(job, f) for f in PER_SEGMENT}, rotation))
        ended = 0
        while ended < n:
            batch = next(self.messages, None)
            if batch is None:
                raise DataError("internal: the loader workers ended while serving a segment")
            if SEGMENT_END in batch:
                ended += 1
            else:
                yield self.ring.take(batch, pin)
        self.busy = False

    def close(self) -> None:
        """Stop the workers; batches handed out keep their slots, which later forks leave out."""
        self.pool.close()
        self.ring.keep_from_later_forks()


# ----------------------------------------------------------------------------- main process


def finalize(batch: dict, kind: str, pin: bool = False) -> dict:
    """The batch as the caller sees it: `image` (B, 3, H, W) or `video` (B, 3, F, H, W) uint8,
    channels last in memory (strides of (B, F, H, W, 3)); with cascade pairs `image`/`video` at
    the sr size and `image_lr`/`video_lr`. Pixels made in this process lie where `collate`
    wrote them (page-locked when `pin`: see `Stream._allocate`), as every other tensor then is
    (precomputed latents, text embeddings: a non-blocking copy from pageable memory may wait
    for the device's queue).
    `batch_to_device` copies them non-blocking and normalises pixels into contiguous float32
    on the device."""
    batch["valid"] = torch.frombuffer(bytearray(batch["valid"]), dtype=torch.bool)  # list of bools: 1/0 bytes
    pixels, pixels_sr = batch.pop("__pixels__", None), batch.pop("__pixels_sr__", None)
    if pixels is not None:
        name = "image" if kind == "image" else "video"
        if pixels_sr is None:
            batch[name] = _pixels(pixels, kind)
        else:
            batch[name], batch[f"{name}_lr"] = _pixels(pixels_sr, kind), _pixels(pixels, kind)
    if pin:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and not value.is_pinned():
                batch[key] = value.pin_memory()
    return batch


def _pixels(pixels, kind: str) -> torch.Tensor:
    """(B, 3, F, H, W) uint8 over (B, F, H, W, 3) memory (the array `collate` wrote, or the
    tensor `PixelRing.take` made), no copy; (B, 3, H, W) for images."""
    if isinstance(pixels, np.ndarray):  # written in this process (no workers: `Stream._allocate`, or precompute)
        base = pixels.base  # the tensor `_allocate` made it over: its page-locked block, whose non-blocking
        # copy torch's caching host allocator must see (a tensor made anew over the array would not carry it)
        pixels = base if isinstance(base, torch.Tensor) and base.shape == pixels.shape else torch.from_numpy(pixels)
    pixels = pixels.permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
    return pixels[:, :, 0] if kind == "image" else pixels


PIXEL_KEYS = ("image", "video", "image_lr", "video_lr")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on `device` (copied non-blocking: from pinned memory this
    overlaps the copy with compute) and pixels as float32 in [-1, 1], normalised there.

    uint8 pixels (channels last in memory, as the loader delivers them) become contiguous
    x / 127.5 - 1 in float32 on the device, the same values the CPU conversion gave; pixels
    that are already float are moved unchanged."""
    out = {}
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
            continue
        value = value.to(device, non_blocking=True)
        if name in PIXEL_KEYS and value.dtype == torch.uint8:
            value = value.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 127.5).sub_(1.0)
        out[name] = value
    return out


def _refuse_mixed_spaces(sources: list[Manifest]) -> None:
    """Precomputed latents and pixels cannot share a run: a batch of both fails when collated,
    which happens or not by the draws (in resampled mode without buckets, never), so it is
    decided here from the manifests (a source of unknown kind, made by hand, is let through)."""
    latent = [m for m in sources if m.kind == "latent"]
    pixels = [m for m in sources if m.kind in ("image", "video", "mixed")]
    if latent and pixels:
        raise DataError(f"data.shards and data.mixture join precomputed latents ({redact(latent[0].root)}) "
                        f"with pixel shards ({redact(pixels[0].root)}); train on one or the other: precompute "
                        f"the pixel shards too (dit data precompute), or leave the latents out")


def _refuse_repeated_shards(paths: tuple[str, ...]) -> None:
    """An epoch covers its sources' union exactly once: a shard listed twice ("::" parts that
    overlap, a brace pattern naming it twice) would be read twice per epoch, silently."""
    seen: dict[str, str] = {}
    for p in paths:
        real = p if "://" in p or p.startswith("pipe:") else os.path.realpath(p)
        if real in seen:
            raise DataError(f"data.shards lists the shard {p} twice (also as {seen[real]}): an epoch would read "
                            f"its samples twice; list each shard once (overlapping '::' sources or patterns)")
        seen[real] = p


def _sources(cfg: DataConfig) -> tuple[list[Manifest], list[float]]:
    """The sources and their weights in resampled draws: the "::" parts of `data.shards` share
    weight 1.0 by their sample counts (draws from them are draws from their union, as an epoch
    covers it and as open_clip resamples joined sources), each `data.mixture` entry its own. A
    part had weight 1.0 alone: a 10-sample source joined to a million-sample one got half of
    the draws."""
    if "${" in cfg.shards:
        raise DataError(f"data.shards={cfg.shards!r} holds an unresolved interpolation; load the run "
                        f"config with trainer.config.load_config or give a shard directory")
    own = resolve_sources(cfg.shards) if cfg.shards.strip() or not cfg.mixture else []  # "": mixture only
    total = sum(m.num_samples for m in own)
    weights = [m.num_samples / total if total else 0.0 for m in own] + [float(w) for w in cfg.mixture.values()]
    return own + [resolve_source(s.strip()) for s in cfg.mixture], weights


class Stream:
    """The batches of one rank, infinite over epochs.

    Iterate it for batches (keys: see `collate` and `finalize`); the state
    advances as batches are handed out, so `state_dict()` may be taken between any two.
    Iterating again after a `break` goes on where it stopped. One iterator at a time. Its
    loader workers are forked once (`start_workers`, or the first iteration) and serve every
    epoch until `close` or a `break`.

    `skip_unreadable=False` where other processes read the same rank's batches (the trainer's
    pipeline stages and sequence-parallel ranks of one replica, each with its own stream): a
    shard that stays unreadable after the retries (a transient failure, seen by one process
    only) stops the stream with a DataError instead of being skipped on this process alone,
    which would shift its batches against theirs. A corrupt sample is skipped by all alike.

    `step_rows`: the batches a rank takes per optimizer step (the trainer's grad_accum): an
    epoch is padded to whole steps (`plan.Segment.batches`).

    `pin`: whether the batches go to a CUDA device, whose non-blocking copies need page-locked
    memory (default: whether CUDA is there). The trainer says where its step runs: a job on
    DeepSpeed's CPU accelerator on a machine with GPUs pinned every batch, and made a CUDA
    context on GPU 0 in every rank for it."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, state: Optional[dict] = None,
                 skip_unreadable: bool = True, step_rows: int = 1, pin: Optional[bool] = None):
        validate_data_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.skip_unreadable = skip_unreadable
        self.sources, self.weights = _sources(cfg)
        for source in self.sources:  # latent shards: made from pixels as this run makes them
            check_pixel_settings(source, cfg)
        _refuse_mixed_spaces(self.sources)
        for mismatch in (latent_shapes_mismatch(self.sources, cfg.batch_size),
                         cascade_pairs_mismatch(self.sources, cfg.sr_resolution)):
            if mismatch is not None:
                raise DataError(": ".join(mismatch))
        self.paths = tuple(p for m in self.sources for p in m.paths())
        if not cfg.resampled:
            _refuse_repeated_shards(self.paths)
        self.offsets = tuple(o for m in self.sources for o in m.offsets())
        self.recorded = tuple(Recorded(s.bytes, s.sha256) for m in self.sources for s in m.shards)
        self.counts = tuple(s.samples for m in self.sources for s in m.shards)
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise DataError(f"data.shards={cfg.shards!r} holds no samples")
        empty = [m.root for m in self.sources if m.num_samples == 0]
        if cfg.resampled and empty:
            raise DataError(f"resampled sources without samples: {empty}; remove them from data.shards/mixture")
        self.spec = TransformSpec.from_config(cfg)
        self.topology = Topology(world_size, max(1, cfg.num_workers), cfg.batch_size,
                                 cfg.bucket_window if self.spec.bucketed else 1, cfg.drop_last, step_rows)
        if cfg.drop_last and not cfg.resampled and self.batches_per_epoch == 0:
            raise DataError(f"{self.num_samples} samples make no full step ({world_size} ranks x {step_rows} "
                            f"batches of {cfg.batch_size}) with data.drop_last=true; set drop_last=false")
        self.dataset = hashlib.sha1("".join(m.fingerprint() for m in self.sources).encode()).hexdigest()[:16]
        self.seed = cfg.seed
        self.epoch = 0
        self.block = cfg.shuffle_buffer  # the epoch's order depends on it: kept until the epoch ends
        self._segments: list[list[int]] = [self.topology.as_list() + [0]]
        self._served: list[list[int]] = [[]]  # per segment: ids handed out of windows open at its end
        # per plan worker: the ids of the samples handed out here of its open window
        self._open: list[list[int]] = [[] for _ in range(self.topology.num_workers)]
        self._stats = empty_counts()
        self._crashed: set[tuple[int, int, int, str]] = set()  # samples a worker died or stalled on, in which
        #                                                        phase and why (kept over epochs, not in the state)
        self._pin = torch.cuda.is_available() if pin is None else pin  # batch_to_device copies non-blocking
        self._workers: Optional[_Workers] = None  # forked once (start_workers), for every segment
        if state is not None:
            self.load_state_dict(state)

    # --- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position of the stream as plain ints and strings (JSON, no pickle):

        {"version": 2, "mode": "epoch"|"resampled", "dataset": fingerprint, "seed": int,
         "epoch": int, "shuffle_buffer": int, "segments": [[world_size, workers, batch_size,
         window, drop_last, step_rows, batches_consumed_per_rank], ...], "served": [[sample id, ...],
         ...]} (segments of states saved before step_rows, one shorter, have one row a step)

        "served" holds, per segment, the ids of the samples handed out of bucket windows that
        were open at its end (now, for the last one): a resume on another layout removes them
        from its plan (`replay`). This rank's own: at most workers x (window - 1) x batch_size.
        A resume on another layout reads one rank's state, so the trainer saves each rank's
        with every rank's ids joined in (`handed_over`)."""
        return {
            "version": STATE_VERSION,
            "mode": self._mode,
            "dataset": self.dataset,
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle_buffer": self.block,
            "segments": [list(s) for s in self._segments],
            "served": self._served[:-1] + [self._open_ids()],
        }

    def _open_ids(self) -> list[int]:
        """This rank's ids handed out of its open windows."""
        return sorted(i for ids in self._open for i in ids)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state; a changed topology starts a new segment of the same epoch."""
        try:
            version, mode, dataset = state["version"], state["mode"], state["dataset"]
            seed, epoch, block = int(state["seed"]), int(state["epoch"]), int(state["shuffle_buffer"])
            segments = [_with_step_rows([int(v) for v in s]) for s in state["segments"]]
            served = [[int(i) for i in ids] for ids in state.get("served", [[] for _ in segments])]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed stream state ({e!r}): expected the dict of Stream.state_dict()") from None
        if version not in (1, STATE_VERSION) or any(len(s) != SEGMENT_FIELDS for s in segments) or not segments or \
                len(served) != len(segments):
            raise DataError(f"stream state version {version} with segments {segments} is not readable "
                            f"by this version ({STATE_VERSION})")
        if mode != self._mode:
            raise DataError(f"the stream state is from a {mode} stream but data.resampled="
                            f"{self.cfg.resampled}; resume with the setting it was saved with")
        if dataset != self.dataset:
            raise DataError(f"the stream state belongs to another dataset (fingerprint {dataset}, these "
                            f"shards: {self.dataset}); resume on the same shards, or start the data "
                            f"position afresh by not passing the state")
        if seed != self.cfg.seed:
            log.warning("resuming the data stream with its saved seed %d (data.seed is %d)", seed, self.cfg.seed)
        while len(segments) > 1 and segments[-1][-1] == 0:
            segments.pop()
            served.pop()
        self.seed, self.epoch, self.block = seed, epoch, block
        # Version 1 grouped a bucket window without the JPEGs whose decoding failed; this one groups
        # them by their header (and makes holes of them at collate): its open windows, grouped again
        # here, would not hold what was handed out of them. Closed as after a change of layout,
        # where the ids recorded as served leave the plan.
        regrouped = version == 1 and mode == "epoch" and bool(served[-1])
        if segments[-1][:-1] != self.topology.as_list() or regrouped:
            if segments[-1][-1] == 0:
                segments.pop()
                served.pop()
            elif mode == "epoch":
                self._warn_open_windows(segments, served)
            segments.append(self.topology.as_list() + [0])
            served.append([])
        self._segments, self._served = segments, served
        self._open = [[] for _ in range(self.topology.num_workers)]
        if mode == "epoch" and served[-1]:
            self._reopen_windows()

    def _reopen_windows(self) -> None:
        """Resumed on the same layout inside windows: give each worker back the loaded ids (of
        every rank) that lie in its open window on this rank, as if it had served them here;
        the state then records what an uninterrupted run's would."""
        order, consumed, loaded = self._order(), self._segments[-1][-1], np.asarray(self._served[-1])
        segment = self._segment()
        for worker in range(self.topology.num_workers):
            window = segment.open_window(worker, consumed)
            ids = order.ids(segment.positions(segment.batch_slots(self.rank, b)[0] for b in window))
            self._open[worker] = ids[np.isin(ids, loaded)].tolist()

    def _warn_open_windows(self, segments: list[list[int]], served: list[list[int]]) -> None:
        """Say how many samples a change of layout serves again: none where the state records
        the ids handed out of open bucket windows (`state_dict`); with a state from before
        that record, those of the windows not finished at the checkpoint (nothing is lost)."""
        closed = [(Topology.from_list(s[:-1]), s[-1]) for s in segments]
        topo, handed = closed[-1]
        before = replay(self.num_samples, closed[:-1], served, self._order())
        after = replay(self.num_samples, closed, served, self._order())
        real = min(handed * topo.world_size * topo.batch_size, Segment(before, topo).real_end)
        again = real - (length(before) - length(after))
        if again > 0:
            log.warning("resuming on another layout (ranks, workers, batch size or bucket window) inside "
                        "bucket windows: %d samples already trained on this epoch are served again (those of "
                        "the windows not finished at the checkpoint; none is lost). Resume on the layout "
                        "it was saved with to see each sample once", again)

    def _segment(self) -> Segment:
        """The plan of the current segment (epoch mode): the positions the closed ones left."""
        closed = [(Topology.from_list(s[:-1]), s[-1]) for s in self._segments[:-1]]
        return Segment(replay(self.num_samples, closed, self._served, self._order()), self.topology)

    def _order(self) -> EpochOrder:
        """The current epoch's order (where `replay` finds the positions of recorded ids)."""
        return EpochOrder(self.counts, self.seed, self.epoch, self.block)

    @property
    def _mode(self) -> str:
        return "resampled" if self.cfg.resampled else "epoch"

    def stats(self) -> dict[str, int]:
        """Samples read and skipped per reason, over the batches handed out by this object."""
        return dict(self._stats)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank); 0 when resampled."""
        if self.cfg.resampled:
            return 0
        return Segment(((0, self.num_samples),), self.topology).batches

    # --- iteration -----------------------------------------------------------------------

    def _job(self) -> Optional[RankJob]:
        """The plan for the current segment; None when the epoch is complete."""
        consumed = self._segments[-1][-1]
        segment = resampled = None
        if self.cfg.resampled:
            starts = np.cumsum([0] + [len(m.shards) for m in self.sources])[:-1]
            resampled = ResampledOrder(
                tuple(int(s) for s in starts),
                tuple(tuple(s.samples for s in m.shards) for m in self.sources),
                tuple(self.weights),
                self.seed, len(self._segments) - 1, self.block,
            )
        else:
            segment = self._segment()
            if consumed >= segment.batches:
                return None
        return dataclasses.replace(self._base_job(), consumed=consumed, seed=self.seed, epoch=self.epoch,
                                   shuffle_buffer=self.block, segment=segment, resampled=resampled,
                                   crashed=frozenset(self._crashed))

    def _base_job(self) -> RankJob:
        """The fields of this rank's jobs that stay from segment to segment (`PER_SEGMENT` aside)."""
        c = self.cfg
        return RankJob(self.paths, self.counts, self.spec, self.topology, self.rank, 0, c.seed, 0, c.shuffle_buffer,
                       None, None, c.error_budget, c.min_errors_before_budget, c.max_logged_skips, self.offsets,
                       dataclasses.replace(remote_options(c), skip_unreadable=self.skip_unreadable), recorded=self.recorded)

    def start_workers(self) -> None:
        """Fork this rank's loader workers now, once (with `data.num_workers > 0`; else nothing).
        They wait for the first segment and serve every later one; iterating forks them when
        they are not there yet. A forked worker shares the memory its parent has at the fork,
        and Linux then copies every page of it that either writes (copy-on-write): workers
        forked by a trainer holding its model and optimizer state (host memory under offload)
        made the first step of each epoch copy all of it (README, "Loader workers and host
        memory"). The trainer calls this before it builds them."""
        if self.cfg.num_workers > 0 and self._workers is None:
            self._workers = _Workers(self._base_job(), self.cfg, self._slot_bytes())

    def close(self) -> None:
        """Stop the loader workers (iterating again forks new ones); batches handed out stay valid."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _allocate(self, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """Without workers, the memory `collate` writes a batch's pixels into: page-locked when
        batches are pinned (no copy to pin them afterwards)."""
        return [torch.empty(shape, dtype=torch.uint8, pin_memory=self._pin).numpy() for shape in shapes]

    def _batches(self, job: RankJob) -> Iterator[dict]:
        """The segment's batches as the workers make them, pixels as tensors over their slots.
        Workers left in the middle of a segment (the caller stopped iterating, an error) are
        stopped; the next iteration forks new ones."""
        if self.cfg.num_workers == 0:
            yield from worker_stream(job, 0, allocate=self._allocate)
            return
        if self._workers is not None and self._workers.busy:  # left by an iterator not yet closed
            self._workers = None
        self.start_workers()
        workers, done = self._workers, False
        try:
            yield from workers.batches(job, self._crashed, self._pin)
            done = True
        except WorkerDied as e:
            raise DataError(f"{e}{workers.marks.describe(e.worker, self.paths)}") from None
        finally:
            if not done:
                workers.close()
                if self._workers is workers:
                    self._workers = None

    def _slot_bytes(self) -> int:
        """The pixels of the largest batch the spec allows: longest clip, largest bucket."""
        spec, b, f = self.spec, self.cfg.batch_size, max(self.spec.frame_counts)
        shapes = [(b, 3, f, max(h * w for h, w in spec.sizes), 1)]
        if spec.sr_sizes is not None:
            shapes.append((b, 3, f, max(h * w for h, w in spec.sr_sizes), 1))
        return slot_bytes(shapes)

    def __iter__(self) -> Iterator[dict]:
        while True:
            job = self._job()
            if job is None:
                self._next_epoch()
                continue
            yield from self._serve(job)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.block = self.cfg.shuffle_buffer
        self._segments = [self.topology.as_list() + [0]]
        self._served = [[]]
        self._open = [[] for _ in range(self.topology.num_workers)]

    def _record(self, segment: Segment, t: int, batch: dict) -> None:
        """Keep the ids of batch t's valid samples while its worker's window stays open (they
        go into the state, see `state_dict`); forget the window's once it closes: the plan then
        counts all its samples as served."""
        worker = t % segment.topo.num_workers
        if _window_closes(segment, t):
            self._open[worker] = []
        else:
            self._open[worker] += [i for i, ok in zip(batch["__sample__"], batch["valid"]) if ok]

    def _serve(self, job: RankJob) -> Iterator[dict]:
        """Hand out the batches of one segment, counting each before the caller sees it."""
        nw, served = job.topo.num_workers, job.consumed
        planned = job.segment.batches if job.segment is not None else None
        for batch in self._batches(job):
            meta = batch.pop("__meta__")
            if meta["worker"] != served % nw:
                raise DataError(f"internal: batch from worker {meta['worker']} where worker {served % nw} "
                                f"was due (the worker pool serves them in turn)")
            for reason, n in meta["stats"].items():
                self._stats[reason] += n
            check_error_budget(self._stats, self.cfg.error_budget, self.cfg.min_errors_before_budget,
                               f"rank {self.rank}")
            if job.segment is not None:
                self._record(job.segment, served, batch)
            served += 1
            self._segments[-1][-1] = served
            if served == planned:  # the state already points at the next epoch
                self._next_epoch()
            yield finalize(batch, self.cfg.kind, self._pin)
        if planned is not None and served != planned:
            raise DataError(f"rank {self.rank} received {served} of the {planned} batches planned for "
                            f"epoch {self.epoch}; a loader worker ended early (see its error above)")


def handed_over(states: list[dict]) -> dict:
    """The first of several ranks' states with its last segment's "served" ids joined with
    those of the others in the same epoch (sorted: the same list on every rank), so that this
    one state resumes any layout exactly once. The others need only their "epoch" and
    "served" (what the trainer gathers: trainer/train_state.py `StreamState`)."""
    first = states[0]
    state = {**first, "served": [list(ids) for ids in first["served"]]}
    state["served"][-1] = sorted({i for s in states if s["epoch"] == first["epoch"] for i in s["served"][-1]})
    return state


def _window_closes(segment: Segment, batch: int) -> bool:
    """Whether a rank's batch `batch` of the segment is the last of its worker's window."""
    t = segment.topo
    worker, k = batch % t.num_workers, batch // t.num_workers  # k: the worker's own batch count
    return (k + 1) % t.window == 0 or k + 1 == len(segment.worker_batches(worker))


def _with_step_rows(segment: list[int]) -> list[int]:
    """A state's segment as saved now: one saved before `step_rows` gets its 1 (one row a step)."""
    return segment[:5] + [1] + segment[5:] if len(segment) == SEGMENT_FIELDS - 1 else segment


def build_stream(cfg: DataConfig, rank: int, world_size: int, *, state: Optional[dict] = None,
                 skip_unreadable: bool = True, step_rows: int = 1, pin: Optional[bool] = None) -> Stream:
    """The batches of `rank` among `world_size`, optionally resuming from `Stream.state_dict()`
    (`skip_unreadable`, `step_rows`, `pin`: see `Stream`)."""
    return Stream(cfg, rank, world_size, state, skip_unreadable, step_rows, pin)
