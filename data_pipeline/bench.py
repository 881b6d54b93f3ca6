"""`dit bench loader`: loader throughput against the raw decode bound of the same samples.

Both sides run in the same process on the same shards with the same number of DataLoader
workers. The raw bound reads every tar front to back and decodes each image to an RGB array
exactly as the loader does (same tar reader, same JPEG draft scale), and nothing else: no
planning, resize/crop, batching or hand-over of the pixels to the main process. The loader
side is the training batch as `Stream` yields it (uint8 pixels; normalising is the device's).
`loader/raw_decode` is the fraction of that bound the full loader reaches (wall clock, best
of the runs). The CPU time per sample (this process plus its reaped workers) is printed too:
on a machine shared with other jobs it is the steadier figure. With `shards` (a directory,
pattern or URL: `s3://bucket/laion`) both sides read those shards instead, so the figures
include the store's latency and bandwidth.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.decode import IMAGE_EXTS, member_type, open_image
from data_pipeline.manifest import MANIFEST_NAME, load_manifest, resolve_source
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_samples
from data_pipeline.tar_reader import TarShard
from data_pipeline.write import write_shards


class _RawDecode(IterableDataset):
    """Worker j decodes shards j, j + workers, ...; yields one sample count per shard."""

    def __init__(self, paths: list[str], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for path in self.paths[j::n]:
            count = 0
            for raw in TarShard(path):
                data = next(v for k, v in raw.members.items() if member_type(k) in IMAGE_EXTS)
                img = open_image(data)
                img.draft("RGB", (self.resolution, self.resolution))
                np.asarray(img.convert("RGB"))
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
    """Decode alone: read every tar, decode each image to an RGB array, nothing else."""
    loader = DataLoader(_RawDecode(paths, resolution), batch_size=None, num_workers=workers)
    return _measure(lambda: sum(loader))


def loader_rate(cfg: DataConfig) -> Rate:
    """One epoch of the full stream (rank 0 of 1)."""

    def run() -> int:
        stream = build_stream(cfg, 0, 1)
        n, batches = 0, stream.batches_per_epoch
        for i, batch in enumerate(stream):
            n += int(batch["valid"].sum())
            if i + 1 == batches:
                break
        return n

    return _measure(run)


@dataclass
class BenchRow:
    workers: int
    raw: Rate
    loader: Rate

    @property
    def ratio(self) -> float:
        return self.loader.samples_per_s / self.raw.samples_per_s

    @property
    def cpu_ratio(self) -> float:
        return self.raw.cpu_us / self.loader.cpu_us


def make_bench_shards(directory: str, num: int, size: int, shard_size: int, progress: bool) -> list[str]:
    """Synthetic JPEG shards for the benchmark (reused when the directory has them)."""
    if not (Path(directory) / MANIFEST_NAME).is_file():
        write_shards(synth_samples(num, seed=0, size=size, image_format="jpg"), directory, shard_size,
                     created_by="dit bench loader", total=num, progress=progress)
    return load_manifest(directory).paths()


def bench_loader(directory: str, num: int = 4096, size: int = 256, resolution: int = 128,
                 batch_size: int = 32, workers: tuple[int, ...] = (1, 2, 4), repeats: int = 2,
                 shard_size: int = 256, progress: bool = True, shards: str = "") -> list[BenchRow]:
    """Best of `repeats` alternating runs of raw decode and loader, per worker count; on
    `shards` (any data.shards source, remote ones included) when given, else on synthetic
    shards made in `directory`."""
    if shards:
        paths, directory = resolve_source(shards).paths(), shards
    else:
        paths = make_bench_shards(directory, num, size, shard_size, progress)
    rows = []
    for w in workers:
        cfg = DataConfig(shards=directory, resolution=resolution, batch_size=batch_size, num_workers=w)
        raws = [raw_decode_rate(paths, resolution, w) for _ in range(repeats)]
        loads = [loader_rate(cfg) for _ in range(repeats)]
        rows.append(BenchRow(w, _best(raws), _best(loads)))
    return rows


def _best(rates: list[Rate]) -> Rate:
    return Rate(max(r.samples_per_s for r in rates), min(r.cpu_us for r in rates))


def format_rows(rows: list[BenchRow], main_workers: int) -> str:
    head = f"{'workers':>7} {'raw decode/s':>13} {'loader/s':>9} {'ratio':>6} {'raw CPU us':>11} {'loader CPU us':>14} {'CPU ratio':>9}"
    lines = [head] + [
        f"{r.workers:>7} {r.raw.samples_per_s:>13.0f} {r.loader.samples_per_s:>9.0f} {r.ratio:>6.3f} "
        f"{r.raw.cpu_us:>11.0f} {r.loader.cpu_us:>14.0f} {r.cpu_ratio:>9.3f}"
        for r in rows
    ]
    main = next((r for r in rows if r.workers == main_workers), rows[-1])
    lines.append(f"loader/raw_decode = {main.ratio:.3f}  ({main.workers} workers, wall clock, best of runs; "
                 f"CPU-time ratio {main.cpu_ratio:.3f}; target >= 0.95)")
    return "\n".join(lines)
