"""Typed configuration of the data pipeline (the `data:` section of a run config).

Lives in `data_pipeline/` so that the pipeline never imports `trainer`; the run config in
`trainer/config.py` composes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # Where the shards are: a directory holding `manifest.json` and `*.tar`, or a brace/glob
    # pattern of tar files ("data/shards-{00000..00009}.tar").
    shards: str = "${run.out_dir}/data"
    # Extra datasets for resampled (infinite, weighted) streams: {"path": weight, ...}.
    mixture: dict[str, float] = field(default_factory=dict)
    kind: str = "image"  # image | video (images become 1-frame clips in video mode)
    resolution: int = 32  # base training resolution (pixels, square crop)
    sr_resolution: int = 0  # > 0: also deliver the same image at this size (cascade pairs)
    random_crop: bool = False  # False: centre crop
    aspect_buckets: list[float] = field(default_factory=list)  # empty: square crops only
    num_frames: int = 8  # video clips: frames per clip
    frame_stride: int = 1  # video clips: take every k-th frame
    batch_size: int = 8  # per rank (micro-batch)
    num_workers: int = 1  # loader worker processes per rank
    seed: int = 0
    resampled: bool = False  # infinite stream, shards drawn with replacement
    error_budget: float = 0.05  # max fraction of bad samples before the run stops
    min_errors_before_budget: int = 20  # the budget applies once this many samples were read
