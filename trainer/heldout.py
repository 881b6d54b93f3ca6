"""Held-out data: synthetic captioned shapes drawn with a seed no training set is written
with, and any shards read once through the data pipeline with a run's data config (decoded and
resized exactly as training data). The yardstick of the shapes judge, of `dit eval` and of the
autoencoder stage's reconstruction report.

"Held-out" means held-out samples, not unseen captions: the generator's vocabulary is small
(a single-shape caption is one of 6 x 3 x 2 x 9 = 324 and fixes its image to the pixel), so a
held-out caption is often one the model was trained on with the very same image (125 of the
first 256 against the demo's 2000 training samples). `training_captions` reads what a run
trained on, so that evaluation can report seen and novel captions apart.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

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
            raise ValueError(f"{shards} holds no pixels (precomputed latents?); read pixel shards "
                             f"(`pixel_source` finds those latents were encoded from)")
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


# ------------------------------------------------------------------------------- training data


def normalize_caption(caption: str) -> str:
    """The form two captions are compared in: case and runs of white space do not count."""
    return " ".join(caption.casefold().split())


def _shard_captions(path: str, num: int, offsets: list[int]) -> Iterator[str]:
    """The caption of each of the `num` samples of one shard, from its `txt` (or json
    `caption`) member alone: a local sample's image, video or latent bytes are never copied.
    Samples the loader would skip are skipped; an unreadable shard raises DataError."""
    from data_pipeline.decode import CAPTION_EXTS, decode_json, member_type, sample_caption
    from data_pipeline.errors import DataError, SkipSample
    from data_pipeline.tar_reader import LazySample, TarShard

    shard = TarShard(path, offsets)
    try:
        for index in range(num):
            try:
                sample = shard.read(index, lazy=True)
                if isinstance(sample, LazySample):
                    members = {ext: bytes(sample.source[off: off + size]) for ext, off, size in sample.spans
                               if member_type(ext) in (*CAPTION_EXTS, "json")}
                else:
                    members = sample.members
                first: dict[str, bytes] = {}
                for ext, data in members.items():
                    first.setdefault(member_type(ext), data)
                caption = sample_caption(first, decode_json(first.get("json", b"{}")))
            except SkipSample as e:
                if e.reason == "unreadable_shard":
                    raise DataError(f"{path}: {e}") from None
                continue
            yield caption
    finally:
        shard.close()


def training_captions(datas: Iterable[DataConfig]) -> set[str]:
    """The normalized captions of every sample the runs of `datas` train on (`data.shards`,
    each "::"-joined source, and the `data.mixture` sources), read from the shards' caption
    members: pixel shards and the latent shards of `dit data precompute` both keep them.
    Raises data_pipeline.errors.DataError (or OSError) when a source cannot be read, e.g.
    the shards are gone: a split of seen and novel captions must not be guessed."""
    from data_pipeline.manifest import resolve_source, source_specs

    specs = []
    for data in datas:
        for spec in [*source_specs(data.shards), *(s for m in data.mixture for s in source_specs(m))]:
            specs += [spec] if spec not in specs else []
    found: set[str] = set()
    for spec in specs:
        manifest = resolve_source(spec)
        for info, path, offsets in zip(manifest.shards, manifest.paths(), manifest.offsets()):
            found.update(normalize_caption(c) for c in _shard_captions(path, info.samples, offsets))
    return found


def _latent_root(path: str, found: dict[str, str]) -> tuple[str, str]:
    """(directory of the nearest manifest above `path`, the shard's name in it): precompute
    names each shard by its path relative to the source (a/x.tar and b/x.tar are two shards),
    so the manifest may sit above the shard's own directory. `found` remembers it per shard
    directory: one existence check per directory, not per shard (each is a request remotely)."""
    from data_pipeline import remote
    from data_pipeline.manifest import MANIFEST_NAME

    start = remote.dirname(path)
    if start not in found:
        directory = start
        while not remote.exists(remote.join(directory, MANIFEST_NAME)) and remote.dirname(directory) != directory:
            directory = remote.dirname(directory)
        found[start] = directory
    return found[start], path[len(found[start]):].lstrip("/")


def pixel_source(shards: str) -> str:
    """`shards` ("::"-joined sources) with each source of latent shards (`dit data precompute`)
    replaced by the pixel shards its samples were encoded from, found through the `source`
    its manifest records (precompute writes each source shard to one of the same relative name);
    pixel sources are kept. ValueError, naming the source, when latents record no source or it
    is gone or holds no pixels."""
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import SOURCE_SEPARATOR, load_manifest, resolve_source, source_specs

    out = []
    for spec in source_specs(shards):
        manifest = resolve_source(spec)
        if manifest.kind != "latent":
            out.append(spec)
            continue
        origins: dict[str, str] = {}  # latent shard directory -> the source its manifest records
        picked = []  # the pixel shard of each latent shard
        roots: dict[str, str] = {}  # a latent shard's directory -> that of the manifest listing it
        for path in manifest.paths():
            directory, name = _latent_root(path, roots)
            if directory not in origins:
                origins[directory] = load_manifest(directory).extra.get("source", "")
            origin = origins[directory]
            if not origin:
                raise ValueError(f"{spec} holds latents whose manifest records no pixel source "
                                 f"(extra.source); the pixel shards they were encoded from are needed")
            try:
                pixels = resolve_source(origin)
            except DataError as e:
                raise ValueError(f"{spec} holds latents encoded from {origin}, which cannot be read now ({e}); "
                                 f"the pixel shards they were encoded from are needed (a relative path is "
                                 f"read from the directory `dit data precompute` ran in)") from None
            if pixels.kind == "latent":
                raise ValueError(f"{spec} holds latents encoded from {origin}, which holds latents too")
            by_name = {s.name: p for s, p in zip(pixels.shards, pixels.paths())}
            if name not in by_name:
                raise ValueError(f"{spec}: latent shard {name} has no pixel shard of that name in {origin}")
            picked.append((origin, by_name[name], len(by_name)))
        whole = {o for o, _, _ in picked}
        if len(whole) == 1 and len(picked) == picked[0][2]:
            out.append(picked[0][0])  # every shard of one source: name it as recorded
        else:
            out += [p for _, p, _ in picked]
    return SOURCE_SEPARATOR.join(out)
