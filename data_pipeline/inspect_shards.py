"""`dit data inspect`: what a shard directory holds, and whether it is intact.

Counts come from the manifest (or a header scan); resolutions and caption statistics from a
sample of up to `max_samples` samples spread over the shards (image headers, and video stream
headers plus each video's first frame for its display rotation: sizes as training sees them).
`verify` recomputes every shard's sha256 and sample count and lists the shards that differ
from the manifest. A source without manifest.json (or a `pipe:` command) has none: its counts
were just taken from the same tars, so the report says it could not verify them.
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

import av
import numpy as np
from tqdm import tqdm

from data_pipeline.decode import (IMAGE_EXTS, VIDEO_EXTS, decode_json, member_type, open_image, orientation,
                                  sample_caption, upright_size)
from data_pipeline import remote
from data_pipeline.color import HLG_TRANSFER, PQ_TRANSFER
from data_pipeline.errors import SkipSample
from data_pipeline.manifest import Manifest, file_digest, resolve_source
from data_pipeline.tar_reader import TarShard, count_samples
from data_pipeline.transforms import frame_rate, pixel_shape, upright_frame, video_length


@dataclass
class Report:
    manifest: Manifest
    members: Counter = field(default_factory=Counter)
    resolutions: Counter = field(default_factory=Counter)
    frames: list[int] = field(default_factory=list)
    rates: Counter = field(default_factory=Counter)  # videos per frame rate (what data.fps is chosen from)
    seconds: list[float] = field(default_factory=list)  # each video's duration, frames / rate
    hdr: Counter = field(default_factory=Counter)  # videos per HDR transfer (HLG, PQ)
    caption_words: list[int] = field(default_factory=list)
    caption_skips: Counter = field(default_factory=Counter)  # samples the loader skips for their caption, by reason
    unreadable: int = 0
    inspected: int = 0
    bad_shards: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    no_manifest: bool = False  # verify asked of a scanned source: nothing recorded to compare with

    @property
    def failed(self) -> bool:
        """Bad shards, or a verify that could not vouch for any shard (a `verify && train` chain stops)."""
        return bool(self.bad_shards) or self.no_manifest


def inspect_shards(source: str, verify: bool = False, max_samples: int = 1000, progress: bool = True) -> Report:
    """Statistics of a shard directory (or pattern), optionally verifying every shard."""
    manifest = resolve_source(source)
    report = Report(manifest)
    per_shard = -(-max_samples // max(len(manifest.shards), 1)) if max_samples > 0 else 0
    for path in tqdm(manifest.paths(), desc="inspecting", unit="shard", disable=not progress):
        _inspect_shard(path, per_shard, report)
    if verify and manifest.scanned:  # its counts and the recount would both read the same tars
        report.no_manifest = True
    elif verify:
        report.verified = True
        for info, path in tqdm(list(zip(manifest.shards, manifest.paths())), desc="verifying",
                               unit="shard", disable=not progress):
            problem = _verify_shard(path, info.samples, info.bytes, info.sha256)
            if problem:
                report.bad_shards[info.name] = problem
    return report


def _verify_shard(path: str, samples: int, size: int, sha256: str) -> str:
    """'' when the shard matches its manifest entry, else what differs."""
    if not remote.is_pipe(path) and not remote.exists(path):
        return "missing"
    actual_size, digest = (0, "") if remote.is_pipe(path) else file_digest(path)
    if sha256 and digest != sha256:
        return f"sha256 mismatch ({actual_size} bytes, manifest says {size})"
    found = count_samples(path)
    if found != samples:
        return f"{found} readable samples, manifest says {samples}"
    return ""


def _inspect_shard(path: str, limit: int, report: Report) -> None:
    if limit <= 0 or (not remote.is_pipe(path) and not remote.exists(path)):
        return
    try:
        for n, raw in enumerate(TarShard(path)):
            if n >= limit:
                break
            report.inspected += 1
            types: dict[str, bytes] = {}  # member type -> its first member, as the loader takes them
            for ext, data in raw.members.items():
                types.setdefault(member_type(ext), data)
            report.members.update(types.keys())
            _media_stats(types, report)
            try:  # the loader's rule: a caption member, else the json's `caption`
                text = sample_caption(types, decode_json(types.get("json", b"{}")))
            except SkipSample as e:
                report.caption_skips[e.reason] += 1
            else:
                report.caption_words.append(len(text.split()))
    except SkipSample:
        report.unreadable += 1


def _media_stats(types: dict[str, bytes], report: Report) -> None:
    image = next((types[t] for t in IMAGE_EXTS if t in types), None)
    video = next((types[t] for t in VIDEO_EXTS if t in types), None)
    try:
        if image is not None:
            img = open_image(image)
            w, h = upright_size(img.size, orientation(img))  # as training sees it
            report.resolutions[f"{w}x{h}"] += 1
        elif video is not None:
            with av.open(io.BytesIO(video)) as c:
                s = c.streams.video[0]
                frame = next(c.decode(s))
                h, w = upright_frame(frame).shape[:2]
                ax, ay = pixel_shape(s, frame)  # as shown: turned upright, pixels that are not square stretched
                report.resolutions[f"{round(w * ax)}x{round(h * ay)}"] += 1
                report.frames.append(video_length(c, s, video))  # as training counts them
                hdr = _HDR.get(frame.color_trc)
                if hdr:
                    report.hdr[hdr] += 1
                rate = frame_rate(s)
                if rate:
                    report.rates[f"{float(rate):.3g}"] += 1
                    report.seconds.append(report.frames[-1] / float(rate))
    except (SkipSample, av.error.FFmpegError, IndexError, OSError, StopIteration):
        report.unreadable += 1


_HDR = {HLG_TRANSFER: "HLG", PQ_TRANSFER: "PQ"}
_HDR_NOTES = {"HLG": "read as SDR, BT.2020 colours converted", "PQ": "refused: tone-map it to SDR first"}


def _summary(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"min {a.min():.{digits}f}, mean {a.mean():.1f}, max {a.max():.{digits}f}"


def format_report(r: Report) -> str:
    """Human-readable lines for the CLI."""
    m = r.manifest
    counts = [s.samples for s in m.shards]
    lines = [
        f"source:      {remote.redact(m.root) or 'pipe:'} ({m.kind}, {m.created_by or 'unknown origin'})",
        f"shards:      {len(m.shards)}, {sum(s.bytes for s in m.shards) / 1e6:.1f} MB",
        f"samples:     {m.num_samples} (per shard: {_summary(counts)})",
        f"inspected:   {r.inspected} samples" + (f", {r.unreadable} unreadable" if r.unreadable else ""),
        "members:     " + ", ".join(f"{k} {v}" for k, v in sorted(r.members.items())),
        "resolutions: " + (", ".join(f"{k} ({v})" for k, v in r.resolutions.most_common(8)) or "-"),
    ]
    if r.frames:
        lines.append(f"frames:      {_summary(r.frames)}")
    if r.rates:
        lines.append("frame rates: " + ", ".join(f"{k} fps ({v})" for k, v in r.rates.most_common(8)))
        lines.append(f"seconds:     {_summary(r.seconds, 1)}")
    if r.hdr:
        lines.append("HDR videos:  " + ", ".join(f"{k} {v} ({_HDR_NOTES[k]})" for k, v in sorted(r.hdr.items())))
    skips = ", ".join(f"{k} {v}" for k, v in sorted(r.caption_skips.items())) or "none"
    lines.append(f"captions:    words {_summary(r.caption_words)}; skipped by the loader: {skips}")
    if r.no_manifest:
        lines.extend(_no_manifest(m))
    if r.verified:
        if r.bad_shards:
            lines.append(f"verify:      {len(r.bad_shards)} BAD shard(s):")
            lines.extend(f"  {name}: {why}" for name, why in sorted(r.bad_shards.items()))
        else:
            lines.append(f"verify:      all {len(m.shards)} shards match the manifest (sha256 and sample count)")
    return "\n".join(lines)


def _no_manifest(m: Manifest) -> list[str]:
    """Why a scanned source was not verified, what was checked instead, and the way to a manifest."""
    if not m.root:
        return ["verify:      NOT DONE: a pipe: source has no manifest.json to verify against",
                "  checked:   only that its tars read",
                "  to verify: give the directory or URL the command reads (a command's output has no folder "
                "for --write-manifest)"]
    root = remote.redact(m.root)
    return ["verify:      NOT DONE: no manifest.json records these shards, so nothing to verify against",
            "  checked:   only that their tars read (the counts above come from reading them just now)",
            f"  to verify: record them while known to be good with `dit data inspect {root} --write-manifest`; "
            "--verify then compares sha256 and sample counts with it"]
