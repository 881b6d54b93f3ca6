"""Writing shards: samples -> WebDataset `.tar` files + `manifest.json`.

Members follow the img2dataset / video2dataset layout: `KEY.jpg|png|webp|avif|mp4|mov|...`
(bytes as found, never re-encoded), `KEY.txt` (the caption) and `KEY.json` (key, caption,
source, size). Inputs are a folder of media with sidecar captions (`a.jpg` + `a.txt`, optional
`a.json` merged into the metadata) or a JSONL of {"path": ..., "caption": ...} lines.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import PIL.Image
import webdataset as wds
from tqdm import tqdm

from data_pipeline.decode import IMAGE_EXTS, PIL_FORMATS, VIDEO_EXTS, orientation, upright_size
from data_pipeline.errors import DataError
from data_pipeline import remote
from data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, file_digest
from data_pipeline.tar_reader import byte_index

log = logging.getLogger("data_pipeline")
SIDECAR_EXTS = (".txt", ".json")  # a media file's caption and metadata in folder mode
# Input file suffix -> member extension: every type the loader decodes (decode.py), .jpeg as jpg.
MEDIA_EXTS = {f".{t}": "jpg" if t == "jpeg" else t for t in (*IMAGE_EXTS, *VIDEO_EXTS)}


class ShardOutput:
    """Where written shards go: a local directory, or a URL of any fsspec store (s3://bucket/x).

    For a URL the shards are staged in a temporary directory; each is uploaded as soon as it
    is finished (one PUT, or a multipart upload completed at its end: readers never see part
    of an object) with its byte index taken first, and deleted locally, so the local disk holds
    one shard at a time. The manifest is written last: a data set that has one is complete.
    Credentials come from the store's environment and profiles; nothing of them is written."""

    def __init__(self, out: str):
        self.out, self.is_url = out, remote.is_url(out)
        existing = _existing_data(out)
        if existing:  # before anything is written: a second manifest would hide the first's shards
            raise DataError(f"{remote.redact(out)} already holds {remote.redact(existing)}; write into an empty "
                            f"directory (or remove what is there first)")
        if self.is_url:
            self._staging = tempfile.TemporaryDirectory(prefix="dit-shards-")
            self.dir = Path(self._staging.name)
        else:
            self.dir = Path(out)
            self.dir.mkdir(parents=True, exist_ok=True)

    def finish(self, local_path: str, samples: int, name: str = "") -> ShardInfo:
        """The manifest entry of a closed shard, `name` relative to the output (default: the
        file's base name); uploaded (and removed here) for a URL."""
        size, digest = file_digest(local_path)
        info = ShardInfo(name or os.path.basename(local_path), samples, size, digest)
        if samples:  # readers jump straight to their samples (a ranged read remotely)
            info.offsets = byte_index(local_path)[1]
        if self.is_url and samples:
            remote.put_file(local_path, remote.join(self.out, info.name))
            os.remove(local_path)
        return info

    def manifest(self, infos: list[ShardInfo], kind: str, created_by: str, extra: dict) -> Manifest:
        """Write the manifest (last) and drop the staging directory."""
        manifest = Manifest(self.out if self.is_url else str(self.dir), infos, kind, created_by, extra)
        manifest.write()
        if self.is_url:
            self._staging.cleanup()
        return manifest


def _existing_data(out: str) -> str:
    """The first shard (*.tar, at any depth) or manifest already at `out`; "" when none."""
    if remote.is_url(out):
        if remote.exists(remote.join(out, MANIFEST_NAME)):
            return remote.join(out, MANIFEST_NAME)
        found = remote.glob_urls(remote.join(out, "**/*.tar")) + remote.glob_urls(remote.join(out, "*.tar"))
        return found[0] if found else ""
    base = Path(out)
    if (base / MANIFEST_NAME).exists():
        return str(base / MANIFEST_NAME)
    return str(next(base.rglob("*.tar"), "")) if base.is_dir() else ""


def write_shards(samples: Iterable[dict], out_dir: str, shard_size: int, *, prefix: str = "shard",
                 max_bytes: float = 3e9, created_by: str = "dit data write",
                 total: Optional[int] = None, progress: bool = True, extra: Optional[dict] = None) -> Manifest:
    """Write samples ({"__key__": str, ext: bytes, ...}) into shards of at most `shard_size`
    samples with webdataset.ShardWriter, in a directory or at a URL (see ShardOutput); return
    (and write) the manifest."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    out = ShardOutput(out_dir)
    infos: list[ShardInfo] = []

    def finished(fname: str) -> None:  # ShardWriter calls this after closing each shard
        infos.append(out.finish(fname, writer.count))

    pattern = str(out.dir / f"{prefix}-%06d.tar")
    writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=max_bytes, post=finished,
                             verbose=0, encoder=False, mtime=0)
    members: Counter = Counter()
    with writer:
        for sample in tqdm(samples, total=total, desc=f"writing {remote.redact(out_dir)}", unit="sample",
                           disable=not progress):
            writer.write(sample)
            members.update(k.rsplit(".", 1)[-1] for k in sample if not k.startswith("__"))
    for info in [i for i in infos if i.samples == 0]:  # ShardWriter opens a first shard eagerly
        (out.dir / info.name).unlink(missing_ok=True)
    return out.manifest([i for i in infos if i.samples > 0], dataset_kind(members), created_by, extra or {})


def sanitize_key(name: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def media_sample(key: str, path: Path, caption: str, meta: Optional[dict] = None) -> dict:
    """One sample from a media file and its caption; DataError for unusable files."""
    ext = MEDIA_EXTS.get(path.suffix.lower())
    if ext is None:
        raise DataError(f"{path}: unsupported type (use {', '.join(sorted(set(MEDIA_EXTS.values())))})")
    data = path.read_bytes()
    extra = {k: v for k, v in (meta or {}).items() if k not in ("key", "caption")}  # txt and json say the same
    info = {"key": key, "caption": caption, "source": str(path), **extra}
    if ext not in VIDEO_EXTS:
        try:
            with PIL.Image.open(path, formats=PIL_FORMATS) as img:
                width, height = upright_size(img.size, orientation(img))  # as the loader sees it
                info.update(width=width, height=height)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:  # the loader skips these too
            raise DataError(f"{path}: not a readable image ({e})") from None
    return {"__key__": key, ext: data, "txt": caption.encode(), "json": json.dumps(info).encode()}


class InputReport:
    """What was skipped while collecting inputs, by reason, for the CLI summary."""

    def __init__(self):
        self.skipped: Counter = Counter()

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 20:
            log.warning("skipping %s: %s", what, reason)


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate


def folder_samples(root: str, report: InputReport) -> Iterator[dict]:
    """Media files under `root` (sorted) with their sidecar `.txt` caption (and `.json`)."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{root} is not a directory")
    used: set[str] = set()
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        caption_file = path.with_suffix(".txt")
        if path.suffix.lower() not in MEDIA_EXTS:
            if path.suffix.lower() not in SIDECAR_EXTS and caption_file.is_file():  # captioned, not media we read
                report.skip(f"unsupported type {path.suffix.lower()} (convert to "
                            f"{', '.join(sorted(set(MEDIA_EXTS.values())))})", str(path))
            continue
        if not caption_file.is_file():
            report.skip("missing caption", f"{path} (no {caption_file.name})")
            continue
        try:
            caption = caption_file.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:  # the loader skips such a caption as corrupt_text; never U+FFFD
            report.skip("caption not UTF-8", str(caption_file))
            continue
        if not caption:
            report.skip("empty caption", str(caption_file))
            continue
        meta = _sidecar_json(path.with_suffix(".json"), report)
        key = _unique(sanitize_key(str(path.relative_to(base).with_suffix(""))), used)
        try:
            yield media_sample(key, path, caption, meta)
        except DataError as e:
            report.skip("unreadable media", str(e))


def _sidecar_json(path: Path, report: InputReport) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        report.skip("malformed json sidecar", f"{path} ({e})")
        return {}
    return value if isinstance(value, dict) else {"value": value}


def jsonl_samples(jsonl: str, report: InputReport) -> Iterator[dict]:
    """Lines {"path": ..., "caption": ..., ["key": ...]}; relative paths from the file's folder."""
    base = Path(jsonl).parent
    used: set[str] = set()
    with open(jsonl) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, caption = Path(row["path"]), row["caption"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{jsonl}:{n}: expected {{\"path\": ..., \"caption\": ...}} ({e!r})") from None
            if not isinstance(caption, str):  # null or a list would be trained on as "None" / "['red', 'dog']"
                report.skip("caption not a string", f"{jsonl}:{n} ({type(caption).__name__})")
                continue
            caption = caption.strip()
            if not caption:
                report.skip("empty caption", f"{jsonl}:{n}")
                continue
            path = path if path.is_absolute() else base / path
            key = _unique(sanitize_key(str(row.get("key", f"{n - 1:09d}"))), used)
            extra = {k: v for k, v in row.items() if k not in ("path", "caption", "key")}
            try:
                yield media_sample(key, path, caption, extra)
            except (DataError, OSError) as e:
                report.skip("unreadable media", f"{jsonl}:{n}: {e}")



def dataset_kind(member_types: Counter) -> str:
    """image | video | mixed | latent, from the member types written."""
    has_video = any(member_types[t] for t in VIDEO_EXTS)
    has_image = any(member_types[t] for t in IMAGE_EXTS)
    if has_video or has_image:
        return "mixed" if has_video and has_image else "video" if has_video else "image"
    return "latent" if member_types["safetensors"] or member_types["npy"] else "unknown"
