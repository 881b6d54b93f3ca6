"""`manifest.json`: the per-shard sample counts, sizes and checksums of a shard directory.

The loader plans exactly-once epochs from the sample counts, so it needs them before it
reads a byte. Shards written by `dit data write|synth|precompute` come with a manifest;
for foreign shards (img2dataset, video2dataset) the counts are taken by scanning the tar
headers, and `dit data inspect DIR --write-manifest` stores them once.

Sources may be remote (see remote.py): a URL of a directory holding manifest.json
(`s3://bucket/laion`), a brace/glob pattern of URLs (`s3://bucket/laion/{00000..09999}.tar`)
or `pipe:` commands. Manifests carry a byte index per shard (`offsets`: where each sample's
first header starts; not for pipes, nor for a shard where a key repeats) so that a worker
reads only the headers and bytes of its own samples (of a URL: only their byte ranges).
Latent shards (`dit data precompute`) also record the `data.` settings that shaped the
pixels they were encoded from (`pixel_settings`); the loader refuses a run whose own differ.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import braceexpand

from data_pipeline import remote
from data_pipeline.config import DEFAULT_BUCKET_MULTIPLE, bucket_sizes
from data_pipeline.errors import DataError
from data_pipeline.tar_reader import byte_index, count_samples

MANIFEST_NAME = "manifest.json"
SOURCE_SEPARATOR = "::"
# Latent shards (`dit data precompute`): the `data.` settings their pixels were made with,
# under this key of the manifest's `extra` (see `pixel_settings`)
PIXEL_SETTINGS = "data"
ENCODED_BY = "encoded_by"  # extra: what made precomputed latents (trainer.encoder_record.encoder_identity)
STAND_IN = "stand_in"  # an encoded_by key: the latents are a test stand-in's (precompute.toy_encoder), not a model's
LATENT_BUCKETS = "buckets"  # extra: precomputed samples per pixel bucket, {"FxHxW": count} (`bucket_name`)
log = logging.getLogger("data_pipeline")


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's directory
    samples: int
    bytes: int = 0
    sha256: str = ""  # "" when not recorded (scanned shards)
    offsets: list[int] = field(default_factory=list)  # byte index (tar_reader.byte_index); [] when absent


@dataclass
class Manifest:
    root: str  # directory the shard names are relative to
    shards: list[ShardInfo]
    kind: str = "unknown"  # image | video | latent | mixed | unknown
    created_by: str = ""
    extra: dict = field(default_factory=dict)
    # counted just now from the tars themselves (no manifest.json was read): nothing recorded
    # to verify them against; never written, so a manifest read back is not "scanned"
    scanned: bool = field(default=False, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def paths(self) -> list[str]:
        return [remote.join(self.root, s.name) for s in self.shards]

    def offsets(self) -> list[list[int]]:
        """The byte index of each shard ([] where absent or not matching the count)."""
        return [s.offsets if len(s.offsets) == s.samples else [] for s in self.shards]

    def fingerprint(self) -> str:
        """Identifies the shard names and counts (not the content): stream states refer to it."""
        text = json.dumps([[s.name, s.samples] for s in self.shards])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "version": 1,
            "kind": self.kind,
            "created_by": self.created_by,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "shards": [{k: v for k, v in asdict(s).items() if k != "offsets" or v} for s in self.shards],
            "extra": self.extra,
        }

    def write(self):
        """Write `manifest.json` into `root` atomically (a URL: in one PUT)."""
        text = json.dumps(self.to_json(), indent=1) + "\n"
        if remote.is_url(self.root):
            url = remote.join(self.root, MANIFEST_NAME)
            remote.write_text(url, text)
            return remote.redact(url)
        path = Path(self.root) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    if remote.is_url(path):
        fs, inner = remote.filesystem(path)
        f = fs.open(inner, "rb", block_size=8 << 20)
    else:
        f = open(path, "rb")
    with f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def load_manifest(directory: str) -> Manifest:
    """Read `DIR/manifest.json`; DataError when it is missing or malformed."""
    path = remote.join(directory, MANIFEST_NAME) if remote.is_url(directory) else Path(directory) / MANIFEST_NAME
    try:
        d = json.loads(remote.read_text(str(path)))
        shards = [ShardInfo(**s) for s in d["shards"]]
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST_NAME} in {remote.redact(directory)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{remote.redact(str(path))} is malformed ({e}); rewrite it with `dit data inspect "
                        f"{remote.redact(directory)} "
                        f"--write-manifest`") from None
    return Manifest(str(directory), shards, d.get("kind", "unknown"), d.get("created_by", ""), d.get("extra", {}))


def scan_manifest(paths: list[str], kind: str = "unknown", checksums: bool = False) -> Manifest:
    """Build a manifest by counting the samples of tar files (headers only), with their byte
    index. `pipe:` sources are named in full (root "") and get no index."""
    if not paths:
        raise DataError("no shards to scan")
    if any(remote.is_remote(p) for p in paths):
        return _scan_remote(paths, kind, checksums)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    shards = []
    for p in paths:
        size, digest = file_digest(p) if checksums else (os.path.getsize(p), "")
        samples, offsets = byte_index(p)
        shards.append(ShardInfo(os.path.relpath(os.path.abspath(p), root), samples, size, digest, offsets))
    return Manifest(root, shards, kind, "scan", scanned=True)


def _scan_remote(paths: list[str], kind: str, checksums: bool) -> Manifest:
    if not all(remote.is_url(p) for p in paths):
        if not all(remote.is_pipe(p) for p in paths):
            raise DataError("one source mixes pipe: commands with other shards; join them with '::'")
        return Manifest("", [ShardInfo(p, count_samples(p)) for p in paths], kind, "scan", scanned=True)
    root = remote.common_dir([remote.dirname(p) for p in paths])
    shards = []
    for p in paths:
        size, digest = file_digest(p) if checksums else (remote.size_of(p), "")
        samples, offsets = byte_index(p)
        shards.append(ShardInfo(p[len(root) + 1:], samples, size, digest, offsets))
    return Manifest(root, shards, kind, "scan", scanned=True)


def expand_pattern(pattern: str) -> list[str]:
    """Brace and glob expansion of a shard pattern, sorted, existing files only."""
    files: list[str] = []
    for p in braceexpand.braceexpand(pattern):
        files.extend(sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else []))
    return files


def _resolve_remote(spec: str) -> Manifest:
    """A URL of a directory (manifest.json or *.tar inside), a brace/glob pattern of URLs, or
    `pipe:` commands (a brace pattern expands into one command per shard)."""
    if remote.is_pipe(spec):
        log.warning("counting the samples of the pipe: source %s by reading it whole (pipes have no "
                    "manifest; a URL source with manifest.json starts at once)", remote.redact(spec))
        return scan_manifest(list(braceexpand.braceexpand(spec)))
    if not spec.endswith(".tar") and not glob.has_magic(spec) and "{" not in spec:
        try:
            return load_manifest(spec)
        except DataError as e:
            if not str(e).startswith(f"no {MANIFEST_NAME}"):
                raise
        paths = shard_urls(spec)
        if not paths:
            raise DataError(f"{remote.redact(spec)} holds neither {MANIFEST_NAME} nor *.tar files (or cannot be "
                            f"listed, as plain HTTP cannot): write one with `dit data inspect URL --write-manifest`")
        log.warning("no %s in %s: counting the samples of %d shards (run `dit data inspect %s "
                    "--write-manifest` once to skip this)", MANIFEST_NAME, remote.redact(spec), len(paths),
                    remote.redact(spec))
        return scan_manifest(paths)
    paths = shard_urls(spec)
    manifests = {d: try_load_manifest(d) for d in {remote.dirname(p) for p in paths}}
    if all(manifests.values()):
        by_path = {remote.join(m.root, s.name): s for m in manifests.values() for s in m.shards}
        missing = [p for p in paths if p not in by_path]
        if not missing:
            root = remote.common_dir([remote.dirname(p) for p in paths])
            shards = [ShardInfo(p[len(root) + 1:], **_counts(by_path[p])) for p in paths]
            return Manifest(root, shards, next(iter(manifests.values())).kind, "subset",
                            _subset_extra(list(manifests.values()), spec))
    paths = [p for p in paths if remote.exists(p)]
    if not paths:
        raise DataError(f"data source {remote.redact(spec)!r} matches no tar file")
    return scan_manifest(paths)


def shard_urls(spec: str) -> list[str]:
    """The tar URLs of a directory URL (listed) or a brace/glob pattern of URLs (expanded)."""
    if not spec.endswith(".tar") and not glob.has_magic(spec) and "{" not in spec:
        return remote.glob_urls(spec.rstrip("/") + "/*.tar")
    paths = []
    for p in braceexpand.braceexpand(spec):
        paths.extend(remote.glob_urls(p) if glob.has_magic(p) else [p])
    return paths


def resolve_source(spec: str) -> Manifest:
    """One source: a shard directory (manifest.json or *.tar inside) or a brace/glob pattern;
    local, a URL, or a `pipe:` command."""
    if remote.is_remote(spec):
        return _resolve_remote(spec)
    if os.path.isdir(spec):
        if (Path(spec) / MANIFEST_NAME).is_file():
            return load_manifest(spec)
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            raise DataError(f"{spec} holds neither {MANIFEST_NAME} nor *.tar files; point data.shards at "
                            f"a shard directory written by `dit data write|synth`")
        log.warning("no %s in %s: counting the samples of %d shards (run `dit data inspect %s "
                    "--write-manifest` once to skip this)", MANIFEST_NAME, spec, len(paths), spec)
        return scan_manifest(paths)
    paths = expand_pattern(spec)
    if not paths:
        raise DataError(f"data source {spec!r} matches no tar file; give a shard directory or a "
                        f"pattern like 'dir/shard-{{000000..000009}}.tar'")
    manifests = {d: try_load_manifest(d) for d in {os.path.dirname(p) for p in paths}}
    if all(manifests.values()):
        by_path = {os.path.join(m.root, s.name): s for m in manifests.values() for s in m.shards}
        missing = [p for p in paths if p not in by_path]
        if not missing:
            root = os.path.commonpath([os.path.dirname(p) for p in paths])
            shards = [ShardInfo(os.path.relpath(p, root), **_counts(by_path[p])) for p in paths]
            return Manifest(root, shards, next(iter(manifests.values())).kind, "subset",
                            _subset_extra(list(manifests.values()), spec))
    return scan_manifest(paths)


def _subset_extra(manifests: list[Manifest], spec: str) -> dict:
    """The records of the manifests a pattern's shards come from that a run checks: their
    `PIXEL_SETTINGS` (the loader compares them with the run's) and `ENCODED_BY` (the encoders
    that made latents, compared by the trainer's preflight); each left out where no manifest
    has it, refused where two differ."""
    extra = {}
    for key, what in ((PIXEL_SETTINGS, "data settings"), (ENCODED_BY, "encoders")):
        records = {json.dumps(_recorded(m.extra[key]) if key == PIXEL_SETTINGS else m.extra[key], sort_keys=True)
                   for m in manifests if m.extra.get(key)}
        if len(records) > 1:
            raise DataError(f"the shards of {remote.redact(spec)!r} were precomputed with different {what} "
                            f"(extra.{key} of their manifests); use shards precomputed with one run config")
        if records:
            extra[key] = json.loads(records.pop())
    return extra


def pixel_settings(cfg) -> dict:
    """The settings of a DataConfig that decide the pixels an encoder sees, as
    transforms.TransformSpec.from_config reads them (areas with `resolution` in them, ratios
    as a set, the multiple bucket sides are rounded to as `bucket_sizes` uses it, the clip
    lengths besides 1 and `num_frames`): what latent shards record, and what a run on them must
    have. The clip settings only in video mode (images are 1-frame clips)."""
    settings = {
        "kind": cfg.kind,
        "resolution": int(cfg.resolution),
        "resolutions": sorted({int(cfg.resolution), *(int(r) for r in cfg.resolutions)}),
        "aspect_buckets": sorted({float(a) for a in cfg.aspect_buckets}) or [1.0],
        "bucket_multiple": int(cfg.bucket_multiple or DEFAULT_BUCKET_MULTIPLE),
        "sr_resolution": int(cfg.sr_resolution),
        "random_crop": bool(cfg.random_crop),
    }
    if cfg.kind == "video":
        settings.update({
            "num_frames": int(cfg.num_frames),
            "frame_buckets": sorted({int(f) for f in cfg.frame_buckets} - {1, int(cfg.num_frames)}),
            "frame_stride": int(cfg.frame_stride),
            "fps": float(cfg.fps),
        })
    return settings


def check_pixel_settings(manifest: Manifest, cfg) -> None:
    """DataError naming the `data.` key where latent shards were precomputed with other pixel
    settings than `cfg` has (a latent keeps nothing of the crop, size or clip sampling it was
    made from); manifests without the record (older ones, pixel shards) pass. A record without
    `bucket_multiple` (written before precompute recorded it) counts as made at the old default,
    DEFAULT_BUCKET_MULTIPLE (8) pixels. Another multiple is refused only where it changes the
    buckets (`bucket_sizes`): square crops at a side both multiples divide are the same pixels."""
    mismatch = pixel_settings_mismatch(manifest, cfg)
    if mismatch is not None:
        raise DataError(": ".join(mismatch))


def pixel_settings_mismatch(manifest: Manifest, cfg) -> Optional[tuple[str, str]]:
    """(the `data.` key, why) where `check_pixel_settings` refuses, else None (the trainer's
    preflight reports it as a config error before any rank starts)."""
    recorded = _recorded(manifest.extra.get(PIXEL_SETTINGS))
    if not isinstance(recorded, dict):
        return None
    for key, value in pixel_settings(cfg).items():
        if key in recorded and recorded[key] != value and not _same_buckets(key, recorded[key], cfg):
            return f"data.{key}", (f"the latent shards in {remote.redact(manifest.root)} were precomputed with "
                                   f"{key}={recorded[key]!r} but this run has {value!r}; train with the data settings "
                                   f"they were made with (extra.{PIXEL_SETTINGS} of their {MANIFEST_NAME}) or "
                                   f"precompute them again from this run's config (dit data precompute SOURCE "
                                   f"--config RUN.yaml)")
    return None


def cascade_pairs_mismatch(manifests: list[Manifest], sr_resolution: int) -> Optional[tuple[str, str]]:
    """("data.shards", why) where cascade pairs (data.sr_resolution > 0, a superres run) are asked
    of precomputed latent shards: they hold the latents of each sample's one image, and no
    low-resolution image beside it (such a run passed every check and stopped at its first step)."""
    latent = next((m for m in manifests if m.kind == "latent"), None)
    if sr_resolution <= 0 or latent is None:
        return None
    return "data.shards", (f"{remote.redact(latent.root)} holds precomputed latents, which keep no low-resolution "
                           f"image of a sample; cascade pairs (data.sr_resolution={sr_resolution}, the superres "
                           f"stage) come from pixel shards: train on those")


def bucket_name(bucket: tuple[int, int, int]) -> str:
    """A pixel bucket (frames, height, width) as latent manifests record it: "17x32x32"."""
    return "x".join(str(int(n)) for n in bucket)


def latent_shapes_mismatch(manifests: list[Manifest], batch_size: int) -> Optional[tuple[str, str]]:
    """("data.shards", why) where precomputed latents of several shapes would meet in a batch: a
    bucket window's leftovers are forced into shared batches, which pixels survive (resized, clips
    cut) and latents do not (the loader stopped at the first such batch, mid-run). Manifests
    without the record (`LATENT_BUCKETS`, older ones) pass, as does a batch of one."""
    buckets: dict[str, int] = {}
    for m in manifests:
        for name, count in (m.extra.get(LATENT_BUCKETS) or {}).items() if m.kind == "latent" else ():
            buckets[name] = buckets.get(name, 0) + count
    if batch_size <= 1 or len(buckets) <= 1:
        return None
    return "data.shards", (f"the precomputed latents come in {len(buckets)} shapes (samples per pixel bucket, "
                           f"frames x height x width: {buckets}) and a batch holds one: a bucket window's "
                           f"leftovers share batches, where pixels are resized and latents cannot be. Precompute "
                           f"latents of one bucket (one data.resolution and aspect ratio; for video, clips of "
                           f"data.num_frames only: data.frame_buckets=[], stills and shorter videos left out or "
                           f"trained in a run of their own), train on the pixel shards, or set data.batch_size=1")


def _recorded(settings):
    """A `PIXEL_SETTINGS` record as written now: older ones lack `bucket_multiple`, which was 8 then
    (anything but a dict is returned as it is)."""
    return {"bucket_multiple": DEFAULT_BUCKET_MULTIPLE, **settings} if isinstance(settings, dict) else settings


def _same_buckets(key: str, recorded, cfg) -> bool:
    """Whether a recorded `bucket_multiple` gives `cfg` the very buckets its own does."""
    return key == "bucket_multiple" and bucket_sizes(replace(cfg, bucket_multiple=recorded)) == bucket_sizes(cfg)


def _counts(s: ShardInfo) -> dict:
    return {"samples": s.samples, "bytes": s.bytes, "sha256": s.sha256, "offsets": s.offsets}


def try_load_manifest(directory: str):
    """The manifest of `directory`, or None where it has none (or a malformed one)."""
    try:
        return load_manifest(directory)
    except DataError:
        return None


def source_specs(spec: str) -> list[str]:
    """The sources of a "::"-joined `data.shards` spec, stripped, in order (empty parts dropped)."""
    return [p.strip() for p in spec.split(SOURCE_SEPARATOR) if p.strip()]


def resolve_sources(spec: str) -> list[Manifest]:
    """Every source of a "::"-joined spec, in order."""
    parts = source_specs(spec)
    if not parts:
        raise DataError("data.shards is empty; set it to a shard directory written by `dit data synth|write`")
    return [resolve_source(p) for p in parts]
