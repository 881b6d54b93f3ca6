"""Typed configuration of the data pipeline (the `data:` section of a run config).

Lives in `data_pipeline/` so that the pipeline never imports `trainer`; the run config in
`trainer/config.py` composes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from data_pipeline.remote import RemoteOptions


# Bucket sides are multiples of this many pixels where nothing asks for more (data.bucket_multiple).
DEFAULT_BUCKET_MULTIPLE = 8


@dataclass
class DataConfig:
    # Where the shards are: a directory holding `manifest.json` and `*.tar`, or a brace/glob
    # pattern of tar files ("data/shards-{00000..00009}.tar"). Several sources are joined with
    # "::" (as in open_clip); an epoch then covers their union exactly once. Remote shards: a
    # URL of a directory holding manifest.json (s3://bucket/laion, gs://..., https://...), a
    # brace/glob pattern of URLs, or WebDataset's "pipe:CMD" (see data_pipeline/remote.py).
    shards: str = "${run.out_dir}/data"
    # Extra datasets for resampled (infinite, weighted) streams: {"path": weight, ...}. The
    # `shards` source takes part with weight 1.0 unless it is "", its "::" parts sharing it by
    # their sample counts (resampled without a mixture: draws from their union). Needs resampled=true.
    mixture: dict[str, float] = field(default_factory=dict)
    kind: str = "image"  # image | video (images become 1-frame clips in video mode)
    resolution: int = 32  # base training resolution (pixels, square crop)
    sr_resolution: int = 0  # > 0: also deliver the same image at this size (cascade pairs)
    random_crop: bool = False  # False: centre crop
    aspect_buckets: list[float] = field(default_factory=list)  # empty: square crops only
    # Multi-resolution buckets: pixel areas given as square sides (16 means 16 x 16 pixels),
    # each with every ratio of aspect_buckets. A sample goes to the largest area not above its
    # own pixel area (the smallest when it is below all), then to the nearest ratio there:
    # images are never upscaled to a larger bucket (SDXL / PixArt-alpha bucketing).
    # Empty: the single area `resolution`, which must be one of these when they are given
    # (it stays the shape of previews and the default of `dit sample`).
    resolutions: list[int] = field(default_factory=list)
    # Bucket sides (height and width of every aspect / area bucket) are rounded to multiples of
    # this many pixels, which the model must be able to patchify: a latent DiT needs multiples
    # of its autoencoder's downsampling x its patch (8 x 2 = 16 for the SD VAE at patch 2), a
    # pixel DiT of its patch. 0: derived from the model when the run config is validated (the
    # least common multiple of 8 and what the model needs); 8 where no model is known.
    bucket_multiple: int = 0
    num_frames: int = 8  # video clips: frames per clip
    frame_stride: int = 1  # video clips: take every k-th frame
    # Video clips: frames sampled at this many per second of video whatever the source's rate
    # (the nearest frame to each time, as ffmpeg's fps filter picks: a 30 fps source at 8 takes
    # every 3.75th frame, a 6 fps one repeats frames), so a clip of num_frames spans the same
    # time in every video. 0: every frame_stride-th frame, a time span that varies with the source.
    fps: float = 0.0
    batch_size: int = 8  # per rank (micro-batch)
    num_workers: int = 1  # loader worker processes per rank
    seed: int = 0
    resampled: bool = False  # infinite stream, shards drawn with replacement
    error_budget: float = 0.05  # max fraction of bad samples before the run stops
    min_errors_before_budget: int = 20  # the budget applies once this many samples were read
    # Video mode: shorter clip lengths a video may fall into when it is too short for
    # num_frames (clips of one length share a batch). 1 (images) and num_frames are implied.
    frame_buckets: list[int] = field(default_factory=list)
    # Samples are shuffled within blocks of this many consecutive samples of the epoch's
    # shard order (like webdataset's shuffle buffer: also the raw bytes held per worker).
    shuffle_buffer: int = 1000
    # The last batches of an epoch: False pads them with repeats of earlier samples marked
    # `valid=False` (every sample is seen exactly once); True drops the remainder instead.
    drop_last: bool = False
    # With several buckets, batches are formed within windows of this many batches.
    bucket_window: int = 8
    prefetch_factor: int = 2  # batches prefetched per worker
    # A loader worker whose batch the rank waits for and that makes no progress for this many
    # seconds (begins, reads or decodes no sample: a native decoder hung on a damaged file) is
    # killed and forked again past the sample it was on, which is skipped as `stalled_decoder`
    # (as a crash is); below the collective timeout (deepspeed.comm_timeout_s), so the other
    # ranks do not time out waiting for this one. 0: wait for ever. (No worker processes,
    # num_workers=0: nothing watches.)
    stall_timeout_s: float = 300.0
    max_logged_skips: int = 20  # per worker and reason; later skips are only counted
    # Remote shards (s3://, gs://, https://, pipe:): bytes per ranged read (the read-ahead held
    # per open shard), retries of a failed read (then the shard is skipped, every sample of it
    # counting against error_budget as `unreadable_shard`) and the first backoff in seconds
    # (doubled per retry). Credentials come from each store's environment, never from here.
    remote_block_size: int = 4194304
    remote_retries: int = 3
    remote_backoff: float = 0.5
    # Remote shards: each worker opens the next shard of its plan in a background thread while
    # it reads the current one (the block at its first planned sample, or the whole shard into
    # cache_dir): one shard ahead, at most remote_block_size bytes (or one shard on disk).
    remote_readahead: bool = True
    # Remote shards: a local directory for whole-shard copies ("" = off), shared by the workers
    # and ranks of a machine, and its size limit in GB (least recently used shards go first).
    # Downloads are atomic; files are named by a hash of the URL (no credentials on disk).
    cache_dir: str = ""
    cache_max_gb: float = 100.0


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the `data.` key when a value cannot work."""
    _validate_mixture_weights(cfg.mixture)
    checks = [
        (cfg.kind in ("image", "video"), "kind", "must be image or video"),
        (cfg.resolution >= 8 and cfg.resolution % 8 == 0, "resolution", "must be a positive multiple of 8"),
        (cfg.sr_resolution == 0 or cfg.sr_resolution > cfg.resolution, "sr_resolution",
         "must be 0 (off) or larger than data.resolution"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
        (cfg.seed >= 0, "seed", "must be >= 0 (it seeds numpy's generator of the epochs' order)"),
        (cfg.num_workers >= 0, "num_workers", "must be >= 0"),
        (cfg.num_frames >= 1, "num_frames", "must be at least 1"),
        (cfg.frame_stride >= 1, "frame_stride", "must be at least 1"),
        (cfg.fps >= 0, "fps", "must be >= 0 (0: clips by data.frame_stride)"),
        (not cfg.fps or cfg.frame_stride == 1, "fps",
         f"clips are sampled either at data.fps or every data.frame_stride-th frame, not both "
         f"(frame_stride={cfg.frame_stride}); set one of them"),
        (all(f >= 1 for f in cfg.frame_buckets), "frame_buckets", "frame counts must be >= 1"),
        (all(f <= cfg.num_frames for f in cfg.frame_buckets), "frame_buckets",
         f"are the shorter clip lengths a video too short for data.num_frames ({cfg.num_frames}) falls into; "
         f"a longer one would give long videos clips longer than num_frames (raise num_frames instead)"),
        (all(a > 0 for a in cfg.aspect_buckets), "aspect_buckets", "ratios (width / height) must be > 0"),
        (all(r >= 8 and r % 8 == 0 for r in cfg.resolutions), "resolutions",
         "every area's side must be a positive multiple of 8"),
        (len(set(cfg.resolutions)) == len(cfg.resolutions), "resolutions", "sides must be distinct"),
        (cfg.bucket_multiple >= 0, "bucket_multiple", "must be 0 (derived from the model) or a number of pixels"),
        (not cfg.resolutions or cfg.resolution in cfg.resolutions, "resolutions",
         f"must include data.resolution ({cfg.resolution}), the size of previews and the default of dit sample"),
        (not cfg.resolutions or cfg.sr_resolution == 0, "resolutions",
         "cascade pairs (data.sr_resolution) come at one area; set data.resolutions=[] for a superres run"),
        (0.0 <= cfg.error_budget <= 1.0, "error_budget", "must be a fraction in [0, 1]"),
        (cfg.min_errors_before_budget >= 0, "min_errors_before_budget", "must be >= 0"),
        (cfg.shuffle_buffer >= 1, "shuffle_buffer", "must be at least 1 (1 = no shuffle within shards)"),
        (cfg.bucket_window >= 1, "bucket_window", "must be at least 1"),
        (cfg.prefetch_factor >= 1, "prefetch_factor", "must be at least 1"),
        (cfg.stall_timeout_s >= 0, "stall_timeout_s", "must be >= 0 seconds (0: wait for ever)"),
        (cfg.remote_block_size >= 512, "remote_block_size", "must be at least 512 bytes (one tar block)"),
        (cfg.remote_retries >= 0, "remote_retries", "must be >= 0"),
        (cfg.remote_backoff >= 0, "remote_backoff", "must be >= 0 seconds"),
        (cfg.cache_max_gb > 0, "cache_max_gb", "must be > 0 (GB of whole shards kept in data.cache_dir)"),
        (all(w > 0 for w in cfg.mixture.values()), "mixture", "weights must be > 0"),
        (not cfg.mixture or cfg.resampled, "mixture",
         "weights only make sense when sampling with replacement: set data.resampled=true, or join "
         "the sources with '::' in data.shards to see their union once per epoch"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ValueError(f"data.{key}: {message}")


CLIP_SETTINGS = ("num_frames", "frame_stride", "fps", "frame_buckets")  # how clips are cut from videos


def check_clip_settings(cfg: DataConfig) -> None:
    """The clip settings, set away from their defaults on an image stream (whose samples are
    single images, 1-frame clips whatever they say), refused naming the key."""
    defaults = DataConfig()
    for key in CLIP_SETTINGS:
        if cfg.kind == "image" and getattr(cfg, key) != getattr(defaults, key):
            raise ValueError(f"data.{key}: is a setting of video clips; data.kind=image reads every sample as one "
                             f"image and ignores it (remove it, or set data.kind=video)")


def _validate_mixture_weights(mixture: dict) -> None:
    """Each source's weight is a number: a nested value (`data.mixture.a.tar=1` reads as
    {a: {tar: 1}}) failed later as a TypeError without a key."""
    for source, weight in mixture.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            dotted = (f"; a source with a dot in its name is given whole: data.mixture={{'{source}.{next(iter(weight))}'"
                      f": 1.0}} or in the YAML" if isinstance(weight, dict) and weight else "")
            raise ValueError(f"data.mixture.{source}: must be a number, the source's weight (got {weight!r}){dotted}")


def bucket_ratios(cfg: DataConfig) -> tuple[float, ...]:
    return tuple(sorted(set(cfg.aspect_buckets))) or (1.0,)


def bucket_areas(cfg: DataConfig) -> tuple[int, ...]:
    return tuple(sorted(cfg.resolutions)) or (cfg.resolution,)


def bucket_size(resolution: int, ratio: float, multiple: int = DEFAULT_BUCKET_MULTIPLE) -> tuple[int, int]:
    """(h, w) with h * w ~ resolution**2 and w / h ~ ratio, both multiples of `multiple`."""
    h = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
    w = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
    return h, w


Sizes = tuple[tuple[int, int], ...]


def bucket_sizes(cfg: DataConfig) -> tuple[Sizes, Optional[Sizes]]:
    """(h, w) of every bucket (areas x ratios, sides rounded to data.bucket_multiple) and the same
    buckets at sr_resolution (None without). Here, not in transforms, so that config validation
    sees the loader's very sizes without importing torch."""
    multiple = cfg.bucket_multiple or DEFAULT_BUCKET_MULTIPLE
    sizes = tuple(bucket_size(a, r, multiple) for a in bucket_areas(cfg) for r in bucket_ratios(cfg))
    if cfg.sr_resolution <= 0:
        return sizes, None
    scale = cfg.sr_resolution / cfg.resolution  # one area only (validate_data_config)
    return sizes, tuple((round(h * scale), round(w * scale)) for h, w in sizes)


def remote_options(cfg: DataConfig) -> RemoteOptions:
    """The data.remote_* and data.cache_* settings as the shard reader takes them."""
    return RemoteOptions(cfg.remote_block_size, cfg.remote_retries, cfg.remote_backoff, cfg.remote_readahead,
                         cfg.cache_dir, int(cfg.cache_max_gb * 1e9))
