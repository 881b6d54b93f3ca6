"""Helpers of the data tests: real tar shards with real PNG/JPEG/MP4 bytes."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable

import webdataset as wds

from data_pipeline.manifest import scan_manifest
from data_pipeline.synth import synth_sample

UNEVEN = (3, 9, 5, 7, 4)  # samples per shard: 28 in all


def write_tar(path: Path, samples: Iterable[dict]) -> None:
    """One shard, written with webdataset's own TarWriter (bytes members only)."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def make_shards(directory: Path, sizes=UNEVEN, *, size: int = 32, video: bool = False, fmt: str = "png",
                frames: int = 6, seed: int = 0, start: int = 0) -> Path:
    """Synthetic shapes shards of the given sizes plus a manifest (counts and sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    index = itertools.count(start)
    for n, count in enumerate(sizes):
        write_tar(directory / f"shard-{n:06d}.tar",
                  [synth_sample(next(index), seed, size, video, fmt, frames) for _ in range(count)])
    write_manifest(directory)
    return directory


def write_manifest(directory: Path) -> None:
    scan_manifest(sorted(str(p) for p in directory.glob("*.tar")), checksums=True).write()


def dataset_keys(directory: Path) -> set[str]:
    """Every key of a shard directory, read by plain webdataset."""
    urls = sorted(str(p) for p in directory.glob("*.tar"))
    return {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def take(stream, n: int) -> list[dict]:
    """The next n batches of a stream (the iterator is closed afterwards, so workers stop)."""
    it = iter(stream)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def valid_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k, v in zip(b["__key__"], b["valid"].tolist()) if v]


def key_sequence(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def json_roundtrip(state: dict) -> dict:
    """What a checkpoint stores and gives back (no pickle)."""
    return json.loads(json.dumps(state))


class TouchOnUnpickle:
    """Unpickling this calls Path(marker).touch(): proof that a loader executed file content."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)
