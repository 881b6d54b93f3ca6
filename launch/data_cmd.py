"""`dit data write|synth|inspect|precompute` and `dit bench loader`: argparse glue only.

`launch/cli.py` calls `register(data_subparsers)` and `register_bench(bench_subparsers)`;
each command's `func(args)` returns the process exit code (0 ok, 1 problems found, 2 a
request its source cannot serve, as argparse's usage errors are 2).
Shards are WebDataset .tar files plus manifest.json (per shard: samples, bytes, sha256).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import sys
import tempfile

from data_pipeline.config import DataConfig


def register(sub) -> None:
    """Add write, synth, inspect and precompute to the subparsers of the `data` command."""
    p = sub.add_parser("write", help="shards from a folder of media with sidecar captions, or a JSONL",
                       description="INPUT is a folder (a.jpg + a.txt [+ a.json], also png/webp/avif and "
                                   "mp4/webm/mov/mkv/avi, "
                                   "searched recursively) or a .jsonl of {\"path\": ..., \"caption\": ...}.")
    p.add_argument("input", help="folder or .jsonl file")
    p.add_argument("--out", required=True, help="output directory or URL such as s3://bucket/laion (must hold "
                                                "no shards yet; credentials from the store's environment)")
    _shard_options(p)
    p.set_defaults(func=cmd_write)

    p = sub.add_parser("synth", help="synthetic captioned shapes (images, or videos with --video)",
                       description="Deterministic images of 1-2 coloured shapes on a 3x3 grid (or a shape "
                                   "moving left/right/up/down) with captions stating every attribute and "
                                   "the ground truth in each sample's json.")
    p.add_argument("--out", required=True, help="output directory or URL (s3://bucket/dir, gs://...)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--video", action="store_true", help="mp4 clips of a moving shape instead of images")
    p.add_argument("--frames", type=int, default=16, help="frames per clip with --video (default 16)")
    p.add_argument("--max-shapes", type=int, default=2, choices=(1, 2),
                   help="shapes per image at most (default 2; 1 makes an easier task)")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                   help="image encoding (default png: lossless, exact colours)")
    p.add_argument("--seed", type=int, default=0)
    _shard_options(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="shard and sample counts, resolutions, caption stats; --verify checks",
                       description="Counts come from manifest.json (or a scan of the tar headers).")
    p.add_argument("source", help="shard directory or brace/glob pattern of .tar files, local or a URL "
                                  "(s3://bucket/dir, https://host/dir/{000..009}.tar)")
    p.add_argument("--verify", action="store_true",
                   help="recompute sha256 and sample counts and compare them with manifest.json; exit 1 on bad "
                        "shards, or when there is no manifest to compare with")
    p.add_argument("--max-samples", type=int, default=1000, help="samples read for statistics (default 1000)")
    p.add_argument("--write-manifest", action="store_true",
                   help="scan the tars (counts and sha256; for URLs also the byte index of every sample) and "
                        "write DIR/manifest.json, e.g. for img2dataset output; a URL (s3://, gs://) or a "
                        "pattern naming every shard of a directory gets it next to its shards (not pipe:, not with --verify)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("precompute", help="shards of encoder outputs (latents, text embeddings)",
                       description="Each source shard becomes a shard of the same name with the same keys, "
                                   "txt and json, plus a safetensors member of the encoder's outputs. The "
                                   "pixels are made with the data: settings of the run config (--config, or "
                                   "the encoder's --encoder-arg config=RUN.yaml, with its overrides=[...]); "
                                   "a pixel flag that contradicts them is refused. The manifest records them, "
                                   "and training on the shards refuses a run whose own differ.")
    p.add_argument("source", help="shard directory, pattern or URL to encode")
    p.add_argument("--out", required=True, help="output directory or URL (s3://bucket/dir, gs://...)")
    p.add_argument("--encoder", default="data_pipeline.precompute:toy_encoder",
                   help="module:factory returning encoder(batch) -> dict[str, Tensor]; for training: "
                        "trainer.stages.pretrain:precompute_encoder with --encoder-arg config=RUN.yaml (default: a "
                        "toy stand-in for tests, which training refuses)")
    p.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the factory (repeatable; JSON literals, else strings)")
    p.add_argument("--config", default="", metavar="RUN.yaml",
                   help="the run config whose data: settings make the pixels (default: --encoder-arg config=..., "
                        "overrides from --encoder-arg overrides=[...]); without one, the flags below over "
                        "DataConfig's defaults")
    p.add_argument("--kind", choices=("image", "video"), default=None, help="data.kind (default image)")
    p.add_argument("--resolution", type=int, default=None, help="data.resolution: centre-crop size (default 32)")
    p.add_argument("--resolutions", type=_numbers(int), default=None, metavar="N,N",
                   help="data.resolutions: pixel areas as square sides (default: resolution only)")
    p.add_argument("--aspect-buckets", type=_numbers(float), default=None, metavar="R,R",
                   help="data.aspect_buckets: width / height ratios (default: square)")
    p.add_argument("--bucket-multiple", type=int, default=None, metavar="PX",
                   help="data.bucket_multiple: bucket sides are multiples of this many pixels; without --config "
                        "give the training run's (lcm of 8 and the autoencoder's downsampling x the DiT's patch: "
                        "16 for the SD VAE at patch 2), as training refuses latents bucketed otherwise (default 8)")
    p.add_argument("--num-frames", type=int, default=None, help="data.num_frames: video frames per clip (default 8)")
    p.add_argument("--frame-buckets", type=_numbers(int), default=None, metavar="N,N",
                   help="data.frame_buckets: shorter clip lengths of short videos (default none)")
    p.add_argument("--frame-stride", type=int, default=None, help="data.frame_stride: every k-th frame (default 1)")
    p.add_argument("--fps", type=float, default=None,
                   help="data.fps: clips sampled at this rate whatever the source's (default 0: by frame stride)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_precompute)


def register_bench(bench_subparsers) -> None:
    """Add `loader` to the `bench` command group."""
    p = bench_subparsers.add_parser("loader", help="loader throughput against the raw decode bound",
                                    description="Creates JPEG shards, then measures samples/s of raw decode "
                                                "(read + decode only) and of the full loader with the same "
                                                "workers, and prints loader/raw_decode.")
    p.add_argument("--dir", default="", help="shard directory to create or reuse (default: a temporary one)")
    p.add_argument("--shards", default="", help="measure on these shards instead (a directory, pattern or URL "
                                                "such as s3://bucket/laion: the store's throughput); --num/--size unused")
    p.add_argument("--num", type=int, default=4096, help="samples (default 4096)")
    p.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--resolution", type=int, default=128, help="training resolution (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="worker counts to measure (default 1,2)")
    p.add_argument("--main-workers", type=int, default=2, help="worker count of the ratio line (default 2)")
    p.add_argument("--repeats", type=int, default=5,
                   help="pairs (raw decode, loader) per worker count after a warm-up pair; the median "
                        "ratio and its spread are printed (default 5)")
    p.set_defaults(func=cmd_bench_loader)


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=float, default=3e9, help="bytes per shard at most (default 3e9)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")


def _data_errors(command):
    """`command` with a DataError (unusable input or output, e.g. an --out that already holds
    shards) reported as one line and exit code 1 instead of a traceback."""

    @functools.wraps(command)
    def run(args) -> int:
        from data_pipeline.errors import DataError

        try:
            return command(args)
        except DataError as e:
            print(f"dit data {getattr(args, 'data_cmd', '')}: {e}", file=sys.stderr)
            return 1

    return run


@_data_errors
def cmd_write(args) -> int:
    from data_pipeline.write import InputReport, folder_samples, jsonl_samples, write_shards

    report = InputReport()
    samples = jsonl_samples(args.input, report) if args.input.endswith(".jsonl") else folder_samples(args.input, report)
    manifest = write_shards(samples, args.out, args.shard_size, prefix=args.prefix,
                            max_bytes=args.max_shard_bytes, created_by="dit data write")
    print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out} ({manifest.kind})")
    for reason, n in sorted(report.skipped.items()):
        print(f"skipped {n} inputs: {reason}")
    if manifest.num_samples == 0:  # a `write && launch` chain must stop here, not at training
        print(f"dit data write: no sample was written from {args.input}: nothing to train on", file=sys.stderr)
        return 1
    return 0


@_data_errors
def cmd_synth(args) -> int:
    from data_pipeline.synth import synth_samples
    from data_pipeline.write import write_shards

    samples = synth_samples(args.num, args.seed, args.size, args.video, args.format, args.frames,
                            args.max_shapes)
    manifest = write_shards(samples, args.out, args.shard_size, prefix=args.prefix, max_bytes=args.max_shard_bytes,
                            created_by="dit data synth", total=args.num,
                            extra={"seed": args.seed, "size": args.size, "video": args.video})
    print(f"wrote {manifest.num_samples} synthetic {manifest.kind} samples in {len(manifest.shards)} shards to {args.out}")
    return 0


@_data_errors
def cmd_inspect(args) -> int:
    from data_pipeline import remote
    from data_pipeline.inspect_shards import format_report, inspect_shards

    if args.write_manifest and args.verify:
        print("dit data inspect: --verify compares the shards with the manifest that is there, and --write-manifest "
              "first replaces it with a scan of the same shards, which they always match; verify first, then "
              "write the manifest (two runs)", file=sys.stderr)
        return 2
    if args.write_manifest:
        if remote.is_pipe(args.source):
            print("dit data inspect: --write-manifest needs a folder to write manifest.json into, and a pipe: "
                  "command's output has none; give the directory or URL the command reads", file=sys.stderr)
            return 2
        manifest = refreshed_manifest(args.source)
        print(f"wrote {manifest.write()} ({len(manifest.shards)} shards, {manifest.num_samples} samples)")
    report = inspect_shards(args.source, verify=args.verify, max_samples=args.max_samples)
    print(format_report(report))
    return 1 if report.failed else 0


def refreshed_manifest(source: str):
    """The manifest `--write-manifest` writes for a shard directory (or a pattern, local or a
    URL, naming every shard of one directory): counts, byte index and sha256 scanned afresh; the
    kind, creator and extra of a manifest already there kept (what precompute recorded: the pixel
    settings and source that training and audits check). DataError for a pattern naming only
    some of its directory's shards: a manifest of those would hide the others from training."""
    from data_pipeline import remote
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import try_load_manifest, scan_manifest

    root, paths, every = _manifest_shards(source)
    if set(every) - set(paths):
        raise DataError(f"{remote.redact(source)} names {len(paths)} of the {len(every)} shards in "
                        f"{remote.redact(root)}; its manifest must list them all: give the directory")
    previous = try_load_manifest(root)
    if previous:  # shards it lists below the directory (precompute keeps the source's folders)
        paths = sorted({*paths, *(p for p in previous.paths() if remote.exists(p))})
    manifest = scan_manifest(paths, checksums=True)
    for info in manifest.shards:  # names relative to the directory itself
        info.name = remote.join(manifest.root, info.name)[len(root):].lstrip("/")
    manifest.root = root
    if previous:
        manifest.kind, manifest.created_by, manifest.extra = previous.kind, previous.created_by, previous.extra
    return manifest


def _manifest_shards(source: str) -> tuple[str, list[str], list[str]]:
    """(the directory the manifest goes into, the shards `source` names, the .tar files directly
    in that directory). A pattern's directory is its shards' common one, as a URL pattern's is."""
    from data_pipeline import remote
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import expand_pattern, shard_urls

    if remote.is_url(source):  # a directory URL or a pattern: the manifest goes next to the shards
        paths = shard_urls(source)
        root = remote.common_dir([remote.dirname(p) for p in paths]) if paths else source.rstrip("/")
        return root, paths, shard_urls(root)
    if os.path.isdir(source):
        root = os.path.abspath(source)
        paths = sorted(glob.glob(os.path.join(root, "*.tar")))
        return root, paths, paths
    paths = [os.path.abspath(p) for p in expand_pattern(source)]
    if not paths:
        raise DataError(f"{source!r} matches no tar file; give a shard directory or a pattern like "
                        f"'dir/shard-{{000000..000009}}.tar'")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return root, paths, sorted(glob.glob(os.path.join(root, "*.tar")))


# `dit data precompute` flags (dest = the data. key) that shape the pixels the encoder sees
PIXEL_FLAGS = ("kind", "resolution", "resolutions", "aspect_buckets", "bucket_multiple", "num_frames",
               "frame_buckets", "frame_stride", "fps")


@_data_errors
def cmd_precompute(args) -> int:
    from data_pipeline.precompute import load_encoder, precompute

    kwargs = {key: _literal(value) for key, _, value in (item.partition("=") for item in args.encoder_arg)}
    cfg = precompute_data_config(args, kwargs)  # config errors before the encoder loads
    encoder = load_encoder(args.encoder, **kwargs)
    manifest = precompute(args.source, args.out, encoder, cfg, batch_size=args.batch_size,
                          encoded_by=getattr(encoder, "encoded_by", None))  # what identifies its weights, if it says
    skipped = sum(v for k, v in manifest.extra["skipped"].items() if k != "read")
    print(f"encoded {manifest.num_samples} samples into {len(manifest.shards)} shards in {args.out}"
          + (f" ({skipped} skipped, see warnings)" if skipped else ""))
    if manifest.num_samples == 0:  # a `precompute && launch` chain must stop here, not at training
        print(f"dit data precompute: no sample was encoded from {args.source}: nothing to train on", file=sys.stderr)
        return 1
    return 0


def precompute_data_config(args, kwargs: dict) -> DataConfig:
    """The data settings of `dit data precompute`: the run config's `data:` section (`--config`,
    or the encoder's `config=` with its `overrides=`) where one is named, each pixel flag given
    refused unless it says the same (`--bucket-multiple` against the multiple the run derives from
    its model); else the flags over DataConfig's defaults, which know no model: buckets at
    `--bucket-multiple` or 8 px, recorded in the manifest, so a run bucketing otherwise is refused."""
    from trainer.config import ConfigError, load_config, validate_data

    flags = {key: getattr(args, key) for key in PIXEL_FLAGS if getattr(args, key) is not None}
    path = args.config or kwargs.get("config") or ""
    if not path:
        data = DataConfig(shards=args.source, **flags)
        validate_data(data)  # flags checked as a run's data section is, the key named
        return data
    if args.config and kwargs.get("config") and os.path.abspath(args.config) != os.path.abspath(str(kwargs["config"])):
        raise ConfigError("data", f"--config {args.config} and --encoder-arg config={kwargs['config']} name "
                                  f"different run configs; the pixels and the encoder must come from one")
    overrides = kwargs.get("overrides") or []
    data = load_config(path, [overrides] if isinstance(overrides, str) else list(overrides)).data
    for key, value in flags.items():
        own = getattr(data, key)
        if (sorted(set(value)) != sorted(set(own))) if isinstance(value, list) else value != own:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"data.{key}", f"{flag} {value} contradicts {own!r} of the run config {path}; drop "
                                             f"the flag (the run's data settings make the pixels) or change the "
                                             f"run config")
    if data.random_crop:
        raise ConfigError("data.random_crop", f"true in {path}, but precomputed latents are centre crops and a run "
                                              f"on them cannot crop at random; set data.random_crop=false for the "
                                              f"run (also in --encoder-arg overrides=[...]) or train on the pixels")
    return dataclasses.replace(data, shards=args.source)


def _numbers(kind):
    """argparse type of a comma-separated list: `16,32` -> [16, 32]."""

    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _literal(text: str):
    """`4` -> 4, `0.5` -> 0.5, `true` -> True, anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_bench_loader(args) -> int:
    from data_pipeline.bench import bench_loader, format_rows

    workers = tuple(int(w) for w in args.workers.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_loader(args.dir or tmp, num=args.num, size=args.size, resolution=args.resolution,
                            batch_size=args.batch_size, workers=workers, repeats=args.repeats, shards=args.shards)
    print(format_rows(rows, args.main_workers))
    return 0
