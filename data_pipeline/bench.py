"""`dit bench loader`: loader throughput against the raw decode bound of the same samples.

Both sides run in the same process on the same shards with the same number of worker
processes (the loader's own `WorkerPool`). The raw bound reads every tar front to back and
decodes each image to an RGB array exactly as the loader does (same tar reader, same decoder
at the same JPEG DCT scale), and nothing else: no planning, resize/crop, batching or hand-over
of the pixels to the main process. The loader side is the training batch as `Stream` yields
it (uint8 pixels; normalising is the device's). Both sides decode every sample of the shards
once (the loader: one epoch, no padding at 4096 samples in batches of 32).

`loader/raw_decode` is the fraction of that bound the full loader reaches: wall clock, per
pair of runs made back to back (so both saw the same load of the machine; the side that goes
first alternates), the median over the pairs after a warm-up pair, with the spread. The CPU
time per sample (this process plus its reaped workers) is printed too: on a machine shared
with other jobs it is the steadier figure. With `shards` (a directory, pattern or URL:
`s3://bucket/laion`) both sides read those shards instead, so the figures include the store's
latency and bandwidth.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import IMAGE_EXTS, member_type, open_image
from data_pipeline.manifest import MANIFEST_NAME, load_manifest, resolve_source
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_samples
from data_pipeline.tar_reader import TarShard
from data_pipeline.transforms import decode_rgb
from data_pipeline.workers import WorkerPool
from data_pipeline.write import write_shards


def _raw_decode(paths: list[str], resolution: int) -> Iterator[int]:
    """Decode each image of these shards; one sample count per shard."""
    for path in paths:
        count = 0
        for raw in TarShard(path):
            data = next(v for k, v in raw.members.items() if member_type(k) in IMAGE_EXTS)
            decode_rgb(open_image(data), resolution, resolution)
            count += 1
        yield count


@dataclass
class Rate:
    samples_per_s: float  # wall clock
    cpu_us: float  # CPU time of this process and its (finished) workers, per sample


def _measure(run) -> Rate:
    """Run `run() -> samples`; wall-clock rate and CPU per sample (workers are reaped by then)."""
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    n = run()
    wall = time.perf_counter() - start
    return Rate(n / wall, (_cpu_seconds() - cpu0) / n * 1e6)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_decode_rate(paths: list[str], resolution: int, workers: int) -> Rate:
    """Decode alone: read every tar, decode each image to an RGB array, nothing else; worker j
    of the loader's own worker pool takes shards j, j + workers, ..."""
    if workers == 0:
        return _measure(lambda: sum(_raw_decode(paths, resolution)))

    def run() -> int:
        pool = WorkerPool(lambda j: _raw_decode(paths[j::workers], resolution), workers, prefetch=2)
        try:
            return sum(pool)
        finally:
            pool.close()

    return _measure(run)


def loader_rate(cfg: DataConfig) -> Rate:
    """One epoch of the full stream (rank 0 of 1)."""

    def run() -> int:
        stream = build_stream(cfg, 0, 1)
        valid, batches = [], stream.batches_per_epoch
        for batch in stream:
            valid.append(batch["valid"])  # counted once at the end: the raw side counts per shard
            if len(valid) == batches:
                break
        return int(torch.cat(valid).sum())

    return _measure(run)


@dataclass
class BenchRow:
    """The runs of one worker count: pairs (raw decode, loader) measured back to back."""

    workers: int
    raws: list[Rate]
    loads: list[Rate]

    @property
    def ratios(self) -> list[float]:
        """loader/raw_decode of each pair (wall clock): the two sides of a pair saw the same load."""
        return [l.samples_per_s / r.samples_per_s for r, l in zip(self.raws, self.loads)]

    @property
    def ratio(self) -> float:
        return float(np.median(self.ratios))

    @property
    def cpu_ratio(self) -> float:
        return float(np.median([r.cpu_us / l.cpu_us for r, l in zip(self.raws, self.loads)]))


def make_bench_shards(directory: str, num: int, size: int, shard_size: int, progress: bool) -> list[str]:
    """Synthetic JPEG shards for the benchmark (reused when the directory has them)."""
    if not (Path(directory) / MANIFEST_NAME).is_file():
        write_shards(synth_samples(num, seed=0, size=size, image_format="jpg"), directory, shard_size,
                     created_by="dit bench loader", total=num, progress=progress)
    return load_manifest(directory).paths()


def bench_loader(directory: str, num: int = 4096, size: int = 256, resolution: int = 128,
                 batch_size: int = 32, workers: tuple[int, ...] = (1, 2), repeats: int = 5,
                 shard_size: int = 256, progress: bool = True, shards: str = "") -> list[BenchRow]:
    """Per worker count, one warm-up pair (not counted: page cache, imports, allocator) and
    then `repeats` pairs of raw decode and loader, back to back, the side that goes first
    alternating; on `shards` (any data.shards source, remote ones included) when given, else
    on synthetic shards made in `directory`."""
    if shards:
        paths, directory = resolve_source(shards).paths(), shards
    else:
        paths = make_bench_shards(directory, num, size, shard_size, progress)
    rows = []
    for w in workers:
        cfg = DataConfig(shards=directory, resolution=resolution, batch_size=batch_size, num_workers=w)
        sides = (lambda: raw_decode_rate(paths, resolution, w), lambda: loader_rate(cfg))
        raws, loads = [], []
        for i in range(repeats + 1):
            first, second = sides if i % 2 == 0 else sides[::-1]
            a, b = first(), second()
            raw, load = (a, b) if i % 2 == 0 else (b, a)
            if i > 0:
                raws.append(raw)
                loads.append(load)
        rows.append(BenchRow(w, raws, loads))
    return rows


def _median(rates: list[Rate]) -> Rate:
    return Rate(float(np.median([r.samples_per_s for r in rates])), float(np.median([r.cpu_us for r in rates])))


def format_rows(rows: list[BenchRow], main_workers: int) -> str:
    head = (f"{'workers':>7} {'raw decode/s':>13} {'loader/s':>9} {'ratio':>6} {'ratio min-max':>14} "
            f"{'raw CPU us':>11} {'loader CPU us':>14} {'CPU ratio':>9}")
    lines = [head]
    for r in rows:
        raw, load = _median(r.raws), _median(r.loads)
        lines.append(f"{r.workers:>7} {raw.samples_per_s:>13.0f} {load.samples_per_s:>9.0f} {r.ratio:>6.3f} "
                     f"{min(r.ratios):>6.3f}-{max(r.ratios):<7.3f} {raw.cpu_us:>11.0f} {load.cpu_us:>14.0f} "
                     f"{r.cpu_ratio:>9.3f}")
    main = next((r for r in rows if r.workers == main_workers), rows[-1])
    lines.append(f"loader/raw_decode = {main.ratio:.3f}  ({main.workers} workers, wall clock, median of "
                 f"{len(main.ratios)} pairs, spread {min(main.ratios):.3f}-{max(main.ratios):.3f}; "
                 f"CPU-time ratio {main.cpu_ratio:.3f}; target >= 0.95)")
    return "\n".join(lines)
