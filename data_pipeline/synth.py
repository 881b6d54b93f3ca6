"""Synthetic captioned shapes: the embedded dataset of the demo, the tests and the judge.

An image shows one or two shapes (circle, square, triangle) in distinct saturated colours,
two clearly different sizes and distinct cells of a 3x3 grid, on a dark grey background;
its caption states every attribute ("a small red circle at the top left and a large blue
square at the bottom right") and its `json` holds them as ground truth. A video shows one
shape crossing the frame in a stated direction ("a large green triangle moving left").

Everything needed to recover the attributes from pixels is a module constant: the colour
of each name (nearest-RGB classification), the half-extent of each size, the centre of each
grid cell, the displacement of each direction. Rendering is plain numpy masks (no
antialiasing), so colours are exact in PNG and the shape area is a pure function of size.
Samples are deterministic in (seed, index), independent of sharding.
"""
from __future__ import annotations

import io
import json
from functools import lru_cache
from typing import Iterator

import numpy as np
import PIL.Image

from data_pipeline import color
from data_pipeline.errors import DataError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (30, 60, 235),
    "yellow": (240, 220, 25),
    "magenta": (220, 25, 220),
    "cyan": (25, 210, 230),
}
BACKGROUND: tuple[int, int, int] = (48, 48, 48)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Half-extent of the shape's bounding box as a fraction of the image side; a cell is 1/3.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.15}
# Centre of each cell of the 3x3 grid as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6), "top": (3 / 6, 1 / 6), "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 3 / 6), "centre": (3 / 6, 3 / 6), "right": (5 / 6, 3 / 6),
    "bottom left": (1 / 6, 5 / 6), "bottom": (3 / 6, 5 / 6), "bottom right": (5 / 6, 5 / 6),
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
# Unit displacement over a clip, in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_FPS = 8
DEFAULT_FRAMES = 16


def sample_attributes(rng: np.random.Generator, video: bool = False, max_shapes: int = 2) -> dict:
    """Random attributes: 1..max_shapes shapes with distinct colours and cells (1 for videos)."""
    n = 1 if video else int(rng.integers(1, max_shapes + 1))
    colors = rng.choice(len(COLORS), n, replace=False)
    cells = rng.choice(len(POSITIONS), n, replace=False)
    shapes = []
    for c, p in zip(colors, cells):
        shapes.append({
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "color": list(COLORS)[int(c)],
            "size": list(SIZES)[int(rng.integers(len(SIZES)))],
            "position": list(POSITIONS)[int(p)],
        })
    if video:
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        shapes[0]["direction"] = direction
        shapes[0]["position"] = _lane_start(shapes[0]["position"], direction)
    return {"kind": "video" if video else "image", "shapes": shapes}


def _lane_start(position: str, direction: str) -> str:
    """The cell a move starts from: same row (or column), on the side it moves away from."""
    x, y = POSITIONS[position]
    dx, dy = DIRECTIONS[direction]
    x = x if dx == 0 else (1 / 6 if dx > 0 else 5 / 6)
    y = y if dy == 0 else (1 / 6 if dy > 0 else 5 / 6)
    return next(name for name, xy in POSITIONS.items() if np.allclose(xy, (x, y)))


def caption(attrs: dict) -> str:
    """The sentence stating every attribute."""
    parts = []
    for s in attrs["shapes"]:
        what = f"a {s['size']} {s['color']} {s['shape']}"
        parts.append(f"{what} moving {s['direction']}" if "direction" in s else f"{what} {POSITION_PHRASES[s['position']]}")
    return " and ".join(parts)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    return c[None, :], c[:, None]  # x (1, S), y (S, 1)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-extent r (fractions)."""
    x, y = _grid(size)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    if shape == "triangle":  # apex up, base 2r at the bottom of the box
        return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - cy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _draw(canvas: np.ndarray, s: dict, centre: tuple[float, float]) -> None:
    canvas[shape_mask(s["shape"], centre[0], centre[1], SIZES[s["size"]], canvas.shape[0])] = COLORS[s["color"]]


def render_image(attrs: dict, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8 image of the shapes at their grid cells."""
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND
    for s in attrs["shapes"]:
        _draw(canvas, s, POSITIONS[s["position"]])
    return canvas


def video_path(shape: dict, num_frames: int) -> list[tuple[float, float]]:
    """Centre of a moving shape per frame: from its start cell across to the opposite side."""
    x0, y0 = POSITIONS[shape["position"]]
    dx, dy = DIRECTIONS[shape["direction"]]
    travel = 4 / 6  # from the first cell centre to the last
    steps = max(num_frames - 1, 1)
    return [(x0 + dx * travel * t / steps, y0 + dy * travel * t / steps) for t in range(num_frames)]


def render_video(attrs: dict, size: int = 64, num_frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 clip of the (first) shape moving in its direction."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUND
    s = attrs["shapes"][0]
    for t, centre in enumerate(video_path(s, num_frames)):
        _draw(frames[t], s, centre)
    return frames


def encode_image(pixels: np.ndarray, fmt: str = "png") -> bytes:
    """PNG (lossless, default), JPEG (quality 95) or WebP bytes of an RGB array."""
    buf = io.BytesIO()
    pil_format = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    options = {"quality": 95} if fmt in ("jpg", "webp") else {"compress_level": 1}
    PIL.Image.fromarray(pixels).save(buf, format=pil_format, **options)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = VIDEO_FPS) -> bytes:
    """H.264 MP4 bytes of a (F, H, W, 3) uint8 clip (H and W even), nearly lossless (crf 12),
    tagged BT.709 (`color.encode_mp4`)."""
    return color.encode_mp4(frames, fps, crf="12", preset="veryfast", threads="1")


def synth_sample(index: int, seed: int = 0, size: int = 64, video: bool = False,
                 image_format: str = "png", num_frames: int = DEFAULT_FRAMES, max_shapes: int = 2) -> dict:
    """One WebDataset sample (`__key__`, png|jpg|webp|mp4, txt, json), deterministic in (seed, index)."""
    attrs = sample_attributes(np.random.default_rng([seed, index]), video=video, max_shapes=max_shapes)
    text = caption(attrs)
    meta = {"key": f"{index:09d}", "caption": text, "width": size, "height": size, "source": "synth", **attrs}
    if video:
        media = {"mp4": encode_mp4(render_video(attrs, size, num_frames))}
        meta.update(num_frames=num_frames, fps=VIDEO_FPS)
    else:
        media = {image_format: encode_image(render_image(attrs, size), image_format)}
    return {"__key__": meta["key"], **media, "txt": text.encode(), "json": json.dumps(meta).encode()}


def synth_samples(num: int, seed: int = 0, size: int = 64, video: bool = False,
                  image_format: str = "png", num_frames: int = DEFAULT_FRAMES, max_shapes: int = 2) -> Iterator[dict]:
    """`num` consecutive synthetic samples (indices 0..num-1). A size videos cannot have is
    refused here, before the first sample is made (and a shard opened for it)."""
    if video:
        check_video_size(size)
    return (synth_sample(i, seed, size, video, image_format, num_frames, max_shapes) for i in range(num))


def check_video_size(size: int) -> None:
    """DataError for a clip side `encode_mp4` cannot encode: H.264 in yuv420p stores colour at
    half resolution, so libx264 refuses odd widths and heights."""
    if size % 2:
        raise DataError(f"synthetic video clips need an even side, not {size} px (H.264 in yuv420p halves the "
                        f"colour resolution); use an even --size such as {size + 1}")
