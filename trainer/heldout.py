"""Held-out data: synthetic captioned shapes that no training set holds, and any shards read
once through the data pipeline with a run's data config (decoded and resized exactly as
training data). The yardstick of the shapes judge, of `dit eval` and of the autoencoder stage's
reconstruction report.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from data_pipeline.config import DataConfig

HELDOUT_SEED = 1_000_003  # synthetic held-out data; training shards are written with small seeds


def _stream_config(data: DataConfig, shards: str, batch_size: int) -> DataConfig:
    """The run's data config reading `shards` once, in order, in this process."""
    return replace(data, shards=shards, mixture={}, resampled=False, num_workers=0, batch_size=batch_size,
                   drop_last=False, random_crop=False)


def stream_samples(data: DataConfig, shards: str, batch_size: int = 64,
                   progress: bool = False) -> Iterator[tuple[Tensor, list[str], list[str]]]:
    """One epoch of (pixels, captions, keys) batches of `shards` through the data pipeline:
    images (B, 3, H, W) or videos (B, 3, F, H, W) in [-1, 1] on the host (the loader's uint8
    normalised by its own `batch_to_device`), padding samples dropped."""
    from data_pipeline.stream import batch_to_device, build_stream

    stream = build_stream(_stream_config(data, shards, batch_size), rank=0, world_size=1)
    batches = iter(stream)
    for _ in tqdm(range(stream.batches_per_epoch), desc=f"reading {Path(shards).name}", disable=not progress,
                  leave=False):
        batch = batch_to_device(next(batches), torch.device("cpu"))
        pixels = batch.get("video" if data.kind == "video" else "image")
        if pixels is None:
            raise ValueError(f"{shards} holds no pixels (precomputed latents?); audit pixel shards")
        valid = batch["valid"].tolist()
        pick = lambda items: [x for x, ok in zip(items, valid) if ok]  # noqa: E731
        yield pixels[batch["valid"]], pick(batch["caption"]), pick(batch["__key__"])


def heldout_set(data: DataConfig, num: int, seed: int = HELDOUT_SEED,
                workdir: Optional[str | Path] = None) -> tuple[Tensor, list[str]]:
    """`num` synthetic samples no training set holds, as the pipeline delivers them with `data`
    (the final size: sr_resolution when set), and their captions."""
    from data_pipeline.synth import VIDEO_FPS, synth_samples
    from data_pipeline.transforms import TransformSpec, clip_span
    from data_pipeline.write import write_shards

    side = data.sr_resolution or data.resolution
    video = data.kind == "video"
    frames = clip_span(data.num_frames, TransformSpec.from_config(data).stride(VIDEO_FPS))  # a clip's source frames
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        write_shards(synth_samples(num, seed=seed, size=side, video=video, num_frames=frames), tmp,
                     shard_size=max(num, 1), progress=False)
        parts = list(stream_samples(data, tmp, batch_size=min(num, 64)))
    pixels = torch.cat([p for p, _, _ in parts])
    return pixels, [c for _, caps, _ in parts for c in caps]
