"""`dit data precompute`: shards of encoder outputs, so large runs skip the encoders.

Each source shard becomes one output shard of the same name holding, per sample, the same
key, `txt` and `json`, and a `safetensors` member with what the encoder returned for it
(e.g. `latent` (C, h, w), `text_emb` (L, D), `text_mask` (L,)). The loader stacks those
tensors into the batch instead of pixels.

The encoder is any callable `encoder(batch) -> dict[str, Tensor]` taking a batch as the
trainer sees it after `batch_to_device` (`image` (B, 3, H, W) or `video` (B, 3, F, H, W)
float32 in [-1, 1], `caption` list[str]) and returning tensors with the batch dimension first. Images are centre-cropped
at the configured resolution, and a video gives its middle clip. The manifest records the `data.` settings the pixels were made
with (`extra.data`, manifest.pixel_settings): a stream over the shards refuses a run whose own differ.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import zlib
from collections import Counter
from typing import Callable, Iterator, Optional

import safetensors.torch
import torch
import webdataset as wds
from tqdm import tqdm

from data_pipeline import remote
from data_pipeline.config import DataConfig, validate_data_config
from data_pipeline.errors import DataError, SkipCounter, SkipSample
from data_pipeline.manifest import (ENCODED_BY, LATENT_BUCKETS, PIXEL_SETTINGS, STAND_IN, Manifest, bucket_name,
                                    pixel_settings, resolve_source)
from data_pipeline.plan import Slot
from data_pipeline.stages import Item, collate, decode_stage, transform_stage
from data_pipeline.stream import batch_to_device, finalize
from data_pipeline.tar_reader import TarShard
from data_pipeline.transforms import TransformSpec
from data_pipeline.write import ShardOutput

Encoder = Callable[[dict], dict[str, torch.Tensor]]


def load_encoder(spec: str, **kwargs) -> Encoder:
    """`module:factory` -> factory(**kwargs), the encoder callable."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--encoder {spec!r}: expected 'module:function', e.g. "
                         f"'data_pipeline.precompute:toy_encoder'")
    factory = getattr(importlib.import_module(module), name, None)
    if factory is None:
        raise ValueError(f"--encoder {spec!r}: {module} has no attribute {name!r}")
    return factory(**kwargs)


def toy_encoder(patch: int = 4, text_dim: int = 16, text_len: int = 8) -> Encoder:
    """A stand-in for tests and demos: average-pooled pixels as `latent`, hashed words as
    `text_emb` (text_len, text_dim) and `text_mask`. Not a learned encoder: `dit data
    precompute` records it (`encoded_by`), and a training run on such latents is refused."""

    def encode(batch: dict) -> dict[str, torch.Tensor]:
        pixels = batch["image"] if "image" in batch else batch["video"].flatten(1, 2)
        latent = torch.nn.functional.avg_pool2d(pixels, patch)  # (B, C, H/p, W/p)
        emb = torch.zeros(len(batch["caption"]), text_len, text_dim)
        mask = torch.zeros(len(batch["caption"]), text_len, dtype=torch.bool)
        for i, text in enumerate(batch["caption"]):
            for j, word in enumerate(text.split()[:text_len]):
                g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
                emb[i, j] = torch.randn(text_dim, generator=g)
                mask[i, j] = True
        return {"latent": latent, "text_emb": emb, "text_mask": mask}

    encode.encoded_by = {STAND_IN: "data_pipeline.precompute:toy_encoder"}  # what no run trains on
    return encode


def _items(path: str, counter: SkipCounter) -> Iterator[Item]:
    centre = (0.5, 0.5, 0.5)  # the crop's centre, and a video's middle clip (its opening: fade-ins, titles)
    try:
        for raw in TarShard(path):
            counter.read()
            if raw.duplicate:
                counter.skip("duplicate_key", path, raw.key, raw.duplicate)
                continue
            yield Item(Slot(0, 0, False, centre), path, raw.key, raw)
    except SkipSample as e:  # a broken tail ends this shard
        counter.skip(e.reason, path, "(rest of shard)", e.detail)


def _encode_group(items: list[Item], encoder: Encoder, kind: str) -> Iterator[dict]:
    batch = batch_to_device(finalize(collate(items, [True] * len(items)), kind), torch.device("cpu"))
    with torch.no_grad():
        out = encoder(batch)
    for name, value in out.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != len(items):
            raise DataError(f"the encoder returned {name!r} without a leading batch dimension of "
                            f"{len(items)}; return dict[str, Tensor] with shape (B, ...)")
    for i, item in enumerate(items):
        tensors = {name: value[i].detach().cpu().contiguous() for name, value in out.items()}
        yield {
            "__key__": item.key,
            "txt": item.sample.caption.encode(),
            "json": json.dumps(item.sample.meta).encode(),
            "safetensors": safetensors.torch.save(tensors),
        }


def precompute(source: str, out_dir: str, encoder: Encoder, cfg: DataConfig, batch_size: int = 32,
               progress: bool = True, encoded_by: Optional[dict] = None) -> Manifest:
    """Encode every usable sample of `source` into shards under `out_dir`, a directory or a
    URL (same shard names; see write.ShardOutput), its pixels made as `cfg` (the run's `data:`
    settings) makes them, centre-cropped. `encoded_by` (what identifies the encoder's weights)
    goes into the manifest, where a later reuse can compare it; so do those settings
    (`manifest.pixel_settings`), which a stream over the shards compares with its own."""
    validate_data_config(cfg)
    centred = dataclasses.replace(cfg, random_crop=False)
    src = resolve_source(source)
    _refuse_source_as_output(src.root, out_dir)
    out = ShardOutput(out_dir)
    spec = TransformSpec.from_config(centred)
    counter = SkipCounter(1.0, 0, cfg.max_logged_skips, "precompute")
    infos, buckets = [], Counter()
    for info, path in tqdm(list(zip(src.shards, src.paths())), desc="precompute", unit="shard", disable=not progress):
        target = out.dir / info.name  # the relative name: a/x.tar and b/x.tar stay two shards
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with wds.TarWriter(str(target), encoder=False, mtime=0) as sink:
            groups: dict[tuple, list[Item]] = {}
            for item in transform_stage(decode_stage(_items(path, counter), counter), spec, counter):
                if item.bad:
                    continue
                buckets[bucket_name(item.bucket)] += 1
                group = groups.setdefault(item.bucket, [])
                group.append(item)
                if len(group) == batch_size:
                    written += _write(sink, groups.pop(item.bucket), encoder, cfg.kind)
            for group in groups.values():
                written += _write(sink, group, encoder, cfg.kind)
        infos.append(out.finish(str(target), written, info.name))
    clips = {}  # how video clips were cut: their latents keep nothing of it
    if cfg.kind == "video":
        clips = {"num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride, "fps": cfg.fps}
    return out.manifest(infos, "latent", "dit data precompute",
                        {"source": src.root, "resolution": cfg.resolution, **clips, "skipped": counter.counts,
                         ENCODED_BY: encoded_by or {}, PIXEL_SETTINGS: pixel_settings(centred),
                         LATENT_BUCKETS: dict(sorted(buckets.items()))})


def _refuse_source_as_output(source_root: str, out_dir: str) -> None:
    """DataError when `out_dir` is the source's own directory: each output shard would
    truncate the source shard it is read from."""
    same = (remote.is_url(out_dir) and out_dir.rstrip("/") == source_root.rstrip("/")) or (
        bool(source_root) and not remote.is_remote(out_dir) and not remote.is_remote(source_root)
        and os.path.realpath(out_dir) == os.path.realpath(source_root))
    if same:
        raise DataError(f"--out {remote.redact(out_dir)} is the source directory; precomputed shards go into "
                        f"a new, empty directory")


def _write(sink: wds.TarWriter, group: list[Item], encoder: Encoder, kind: str) -> int:
    for sample in _encode_group(group, encoder, kind):
        sink.write(sample)
    return len(group)
