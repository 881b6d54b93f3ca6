"""The worker side of the streaming loader (stream.py): the stages a worker runs over the
slots the plan gave it, one generator each, from tar members to collated batches.

    read_stage       tar to samples: each block's samples read in file order, handed out in plan order
    decode_stage     safe decode: allowlisted member types only (decode.py)
    transform_stage  each sample's bucket, and its pixels at the bucket's size (transforms.py): a
                     JPEG's only planned from its header where `collate_stage` decodes it
    batch_stage      the samples of each batch: one bucket, exactly one batch per `batch_size`
                     slots (holes filled, marked invalid)
    collate_stage    batches, pixels written (JPEGs decoded) into memory from `allocate`
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from types import MappingProxyType
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from data_pipeline.decode import Decoded, Jpeg, JsonRecords, decode_sample
from data_pipeline.errors import DataError, SkipCounter, SkipSample
from data_pipeline.plan import Slot
from data_pipeline.progress import PROGRESS
from data_pipeline.tar_reader import LazySample, RawSample, ShardReader
from data_pipeline.transfer import new_arrays
from data_pipeline.transforms import ImagePlan, Pixels, TransformSpec, image_pixels, image_plan, video_pixels

# shapes -> one writable uint8 array of each shape (the batch's memory: a loader slot, pinned memory)
Allocate = Callable[[list[tuple[int, ...]]], list[np.ndarray]]
# the phase of the sample a worker is on (`mark[2]`, stream.SampleMarks): being read or opened, or its pixels decoded
READING, PIXELS = 0, 1
# (shard, index) -> why: the samples a worker died on (or was killed on, stalled) in one phase
Lost = Mapping[tuple[int, int], str]
EMPTY: Lost = MappingProxyType({})
LOST = {"crashed_decoder": "a loader worker died of a crash signal on it",
        "stalled_decoder": "a loader worker made no progress on it for data.stall_timeout_s"}


def begin(mark: Optional[memoryview], shard: int, index: int, phase: int) -> None:
    """Set a worker's mark to the sample it begins (shard -1: none, between two batches), one
    step of progress."""
    if mark is not None:
        mark[0], mark[1], mark[2] = shard, index, phase
        mark[PROGRESS] += 1


@dataclass(slots=True)
class Item:
    """One batch slot on its way through the stages; `bad` names the skip reason. (Slots: one
    is made per sample, and its fields are read at every stage.)"""

    slot: Slot
    shard: str
    key: str = ""  # "#<index in shard>" until the tar member names it
    raw: Optional[RawSample] = None
    sample: Optional[Decoded] = None
    pixels: Optional[Union[Pixels, ImagePlan]] = None
    bad: str = ""

    @property
    def bucket(self) -> tuple:
        if self.pixels is not None:
            return self.pixels.bucket
        return tuple((name, tuple(t.shape)) for name, t in sorted(self.sample.tensors.items()))


def _skip(item: Item, error: SkipSample, counter: SkipCounter) -> None:
    item.bad = error.reason
    counter.skip(error.reason, item.shard, item.key, error.detail)


def read_stage(blocks: Iterable[list[Slot]], reader: ShardReader, paths: tuple[str, ...],
               counter: SkipCounter, mark: Optional[memoryview] = None,
               crashed: Lost = EMPTY) -> Iterator[Item]:
    """Tar to samples: locate each block's samples in file order (headers only; a remote
    sample's bytes too), hand them out in plan order, a local sample's bytes copied out of the
    mapped shard just then: a worker holds one sample's bytes, not its stripe of the block's.
    Each time it starts on a shard, the reader hears which shard comes after (read-ahead).
    `mark` is set to the (shard, index, READING) of each sample as its headers (and a remote
    sample's bytes) are read, and again as it is handed out: the later stages open that sample
    until the next one is handed out (stream.SampleMarks). The samples `crashed` names (a worker
    died or stalled on them while reading or opening them) are skipped unread, for the reason it
    gives."""
    blocks = iter(blocks)
    block = next(blocks, None)
    while block is not None:
        following = next(blocks, None)
        wanted = sorted({(s.shard, s.index) for s in block})
        fetched: dict[tuple[int, int], object] = {}
        upcomings = _upcoming(wanted, following) if reader.reads_ahead else [None] * len(wanted)
        for i, (where, upcoming) in enumerate(zip(wanted, upcomings)):
            if upcoming is not None and (i == 0 or wanted[i - 1][0] != where[0]):
                reader.prefetch(*upcoming)
            if crashed and where in crashed:
                continue  # skipped unread below
            begin(mark, where[0], where[1], READING)  # a remote sample's bytes come now: a stall names it
            try:
                fetched[where] = reader.read(*where, lazy=True)
            except SkipSample as e:
                fetched[where] = e
        for slot in block:
            begin(mark, slot.shard, slot.index, READING)
            counter.read()
            reason = crashed.get((slot.shard, slot.index)) if crashed else None
            if reason is not None:
                item = Item(slot, paths[slot.shard], f"#{slot.index}")
                _skip(item, SkipSample(reason, LOST[reason]), counter)
                yield item
                continue
            got = _loaded(fetched[slot.shard, slot.index])
            if type(got) is RawSample:
                yield Item(slot, paths[slot.shard], got.key, got)
            else:
                item = Item(slot, paths[slot.shard], f"#{slot.index}")
                _skip(item, got, counter)
                yield item
        block = following


def _loaded(got: Union[RawSample, LazySample, SkipSample]) -> Union[RawSample, SkipSample]:
    """A located sample with its member bytes, or why they cannot be read."""
    if type(got) is not LazySample:
        return got
    try:
        return got.load()
    except SkipSample as e:
        return e


def _upcoming(wanted: list[tuple[int, int]], following: Optional[list[Slot]]) -> list[Optional[tuple[int, int]]]:
    """For each (shard, index) read of a block, the first later read of another shard (in this
    block or the next), or None."""
    later = wanted + (sorted({(s.shard, s.index) for s in following}) if following else [])
    out: list[Optional[tuple[int, int]]] = [None] * len(later)
    nxt = None
    for i in reversed(range(len(later))):
        if i + 1 < len(later) and later[i + 1][0] != later[i][0]:
            nxt = later[i + 1]
        out[i] = nxt
    return out[: len(wanted)]


def decode_stage(items: Iterable[Item], counter: SkipCounter) -> Iterator[Item]:
    """Safe decode: allowlisted member types only (see decode.py)."""
    for item in items:
        if not item.bad:
            try:
                item.sample = decode_sample(item.raw, item.shard, counter)
            except SkipSample as e:
                _skip(item, e, counter)
            item.raw = None
        yield item


def transform_stage(items: Iterable[Item], spec: TransformSpec, counter: SkipCounter,
                    defer: bool = False) -> Iterator[Item]:
    """Pixels at the sample's bucket size (tensor-only samples pass through); with `defer`, a
    JPEG's only planned (`ImagePlan`: bucket and crop from its header), decoded by `collate`.
    Other images are decoded here: PIL loads a PNG's pixels to read its EXIF orientation, and a
    window's worth of them kept whole until their batches were collated took ~200 MiB more of a
    worker at 1024 px."""
    for item in items:
        s = item.sample
        if not item.bad and (s.image is not None or s.video is not None):
            try:
                if s.image is not None:
                    plan = defer and type(s.image) is Jpeg
                    item.pixels = (image_plan if plan else image_pixels)(s.image, spec, item.slot.rand)
                else:
                    item.pixels = video_pixels(s.video, spec, item.slot.rand)
            except SkipSample as e:
                _skip(item, e, counter)
            s.image = s.video = None
        yield item


def batch_stage(items: Iterable[Item], batch_size: int, window: int) -> Iterator[tuple[list[Item], list[bool]]]:
    """The samples of each batch (and which are valid): one bucket, exactly one batch per
    `batch_size` slots.

    Slots are taken a window (`window` batches) at a time; within it samples are grouped by
    bucket and the leftovers of partly filled buckets are forced into the remaining batches,
    ordered by bucket so that a forced batch mixes as few clip lengths and sizes as it can.
    Skipped samples leave holes that are filled with repeats marked `valid=False`, so the
    number of batches never depends on the data (no rank waits for another)."""
    waiting = 0  # batches of earlier windows without a single usable sample
    for chunk in _chunks(items, batch_size * window):
        filler = next((it for it in chunk if not it.bad), None)
        groups = _group(chunk, batch_size)
        if filler is None:
            waiting += len(groups)
            continue
        for _ in range(waiting):
            yield [filler] * batch_size, [False] * batch_size
        waiting = 0
        for group in groups:
            members = group or [filler]
            valid = [not it.slot.pad for it in group] + [False] * (batch_size - len(group))
            yield members + [members[0]] * (batch_size - len(members)), valid
    if waiting:
        raise DataError(f"the last {waiting} batches of this worker hold no readable sample (see the "
                        f"skip warnings above for shards and keys); repair or remove those shards")


def collate_stage(batches: Iterable[tuple[list[Item], list[bool]]], allocate: Allocate, counter: SkipCounter,
                  mark: Optional[memoryview] = None, crashed: Lost = EMPTY) -> Iterator[dict]:
    """Batches (`collate`); the samples `crashed` names (a worker died or stalled decoding
    their pixels) are skipped there, not decoded."""
    for items, valid in batches:
        yield collate(items, valid, allocate, counter, mark, crashed)


def _chunks(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _group(chunk: list[Item], batch_size: int) -> list[list[Item]]:
    """Split the usable items of a window into len(chunk) // batch_size groups, by bucket."""
    done: list[list[Item]] = []
    open_groups: dict[tuple, list[Item]] = {}
    for item in chunk:
        if item.bad:
            continue
        group = open_groups.setdefault(item.bucket, [])
        group.append(item)
        if len(group) == batch_size:
            done.append(open_groups.pop(item.bucket))
    leftovers = [it for group in open_groups.values() for it in group]
    if all(it.pixels is not None for it in leftovers):
        leftovers.sort(key=lambda it: it.bucket, reverse=True)  # (F, h, w): clips of one length together
    done.extend(leftovers[i: i + batch_size] for i in range(0, len(leftovers), batch_size))
    return done + [[] for _ in range(len(chunk) // batch_size - len(done))]


def clip_length(counts: list[int]) -> int:
    """The frame count of a batch whose samples have these: their one count, or in a forced
    leftover batch the shortest clip's. Longer clips keep their first frames and stills become
    static clips (`refit`): cut to the still's one frame, a clip would be trained as an image
    under a caption of its motion (14% of the clips of a joint image and video run were)."""
    moving = [f for f in counts if f > 1]
    return min(moving, default=1)


def collate(items: list[Item], valid: list[bool], allocate: Allocate = new_arrays,
            counter: Optional[SkipCounter] = None, mark: Optional[memoryview] = None,
            crashed: Lost = EMPTY) -> dict:
    """One batch. Pixels (B, F, H, W, 3) uint8 are written once, into their final memory from
    `allocate` (a loader slot, see transfer.py), images decoded just then (`write_pixels`).
    Tensor members are stacked by name."""
    items, valid = list(items), list(valid)
    head = items[0]
    if any((it.pixels is None) != (head.pixels is None) for it in items):
        raise DataError(f"a batch mixes samples with and without images/videos ({head.key}); keep "
                        f"precomputed (tensor-only) shards and pixel shards in separate runs")
    pixels = write_pixels(items, valid, allocate, counter, mark, crashed) if head.pixels is not None else []
    batch = {
        "__key__": [it.key for it in items],
        "__sample__": [it.slot.sample for it in items],  # ids: per-sample noise seeds (trainer.diffusion.noise)
        "caption": [it.sample.caption for it in items],
        "json": JsonRecords([it.sample.meta_json for it in items]),
        "valid": valid,
    }
    for field, array in zip(("__pixels__", "__pixels_sr__"), pixels):
        batch[field] = array
    for name, tensor in head.sample.tensors.items():
        parts = [it.sample.tensors.get(name) for it in items]
        if any(p is None or p.shape != tensor.shape for p in parts):
            raise DataError(f"tensor {name!r} is missing or has different shapes within a batch "
                            f"(first: {head.key} {tuple(tensor.shape)}); precompute all shards at one size")
        batch[name] = torch.stack(parts)
    return batch


def write_pixels(items: list[Item], valid: list[bool], allocate: Allocate, counter: Optional[SkipCounter],
                 mark: Optional[memoryview], crashed: Lost) -> list[np.ndarray]:
    """(B, F, H, W, 3) uint8 at the first sample's bucket (and at its sr size), each sample's
    pixels written into its row, once per distinct sample (repeats are copied). A sample whose
    pixels cannot be decoded is skipped as any unusable sample is: its rows (and its place in
    `items`) taken by a repeat of the batch's first good sample, marked invalid in `valid`;
    zeros where no sample is good. `mark` is set to each sample as it is decoded."""
    head = items[0].pixels
    _, h, w = head.bucket
    f = clip_length([it.pixels.bucket[0] for it in items])
    sizes = [(h, w)] + ([head.sr_hw] if head.sr_hw is not None else [])
    outs = allocate([(len(items), f, *hw, 3) for hw in sizes])
    written: dict[int, Optional[int]] = {}  # id(item) -> the row it was written to, None when it failed
    for i, it in enumerate(items):
        if id(it) not in written:
            written[id(it)] = i if _written(it, [out[i] for out in outs], counter, mark, crashed) else None
        elif written[id(it)] is not None:
            for out in outs:
                out[i] = out[written[id(it)]]
    good = next((i for i, it in enumerate(items) if written[id(it)] is not None), None)
    for i, it in enumerate(items):
        if written[id(it)] is None:
            valid[i] = False
            for out in outs:
                out[i] = 0 if good is None else out[good]
            items[i] = it if good is None else items[good]
    return outs


def _written(item: Item, rows: list[np.ndarray], counter: Optional[SkipCounter], mark: Optional[memoryview],
             crashed: Lost) -> bool:
    """Whether one sample's pixels are in its rows; False (the skip counted) when it is unusable."""
    if item.bad:  # a filler that failed in an earlier batch: counted then
        return False
    try:
        reason = crashed.get((item.slot.shard, item.slot.index)) if crashed else None
        if reason is not None:
            raise SkipSample(reason, LOST[reason])
        _write_row(item, rows, mark)
        return True
    except SkipSample as e:
        if counter is None:
            raise
        _skip(item, e, counter)
        return False


def _write_row(item: Item, rows: list[np.ndarray], mark: Optional[memoryview]) -> None:
    """Decode one sample's pixels into its rows, `mark` naming it meanwhile (stream.SampleMarks)."""
    begin(mark, item.slot.shard, item.slot.index, PIXELS)
    item.pixels.write(rows)
