"""Pictures people look at: sample grids with the prompt under each image, GIF/MP4 clips."""
from __future__ import annotations

import textwrap
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FPS = 8.0  # saved videos of a model that learned from no single frame rate (fps=0: data.fps unset)


class NonFinitePixels(ValueError):
    """Pixels holding NaN or inf: written as black or white and scored by a judge, they would
    pass for a picture (fp16 overflows past 65504 where bf16 and fp32 do not)."""


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8; NonFinitePixels where any is NaN or inf
    (every picture written or judged comes through here)."""
    x = x.detach().float()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFinitePixels(f"{bad} of {x.numel()} pixel values are NaN or inf")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _caption_block(text: str, width: int, font: ImageFont.ImageFont, lines: int) -> Image.Image:
    chars = max(8, width // 6)
    wrapped = textwrap.wrap(text, chars)[:lines]
    line_h = 12
    block = Image.new("RGB", (width, line_h * lines + 4), "white")
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(wrapped):
        draw.text((2, 2 + i * line_h), line, fill="black", font=font)
    return block


def image_grid(images: torch.Tensor, prompts: Sequence[str], cols: int = 4, cell: int = 128,
               caption_lines: int = 3) -> Image.Image:
    """Images (N, 3, H, W) in [-1, 1] scaled to `cell` pixels wide and cell * H / W high (their
    aspect kept: `dit sample --height/--width`), each with its prompt below."""
    n, (h, w) = images.shape[0], images.shape[-2:]
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default()
    tiles = []
    for img, prompt in zip(to_uint8(images), prompts):
        pic = Image.fromarray(img).resize((cell, max(1, round(cell * h / w))), Image.NEAREST)
        cap = _caption_block(prompt, cell, font, caption_lines)
        tile = Image.new("RGB", (cell, pic.height + cap.height), "white")
        tile.paste(pic, (0, 0))
        tile.paste(cap, (0, pic.height))
        tiles.append(tile)
    th = tiles[0].height
    grid = Image.new("RGB", (cols * (cell + 4), rows * (th + 4)), (230, 230, 230))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (cell + 4) + 2, (i // cols) * (th + 4) + 2))
    return grid


def save_image_grid(images: torch.Tensor, prompts: Sequence[str], path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, prompts, **kw).save(path)
    return path


def save_video_grid(videos: torch.Tensor, prompts: Sequence[str], path: str | Path, fps: float = 0.0,
                    **kw) -> Path:
    """Videos (N, 3, F, H, W) in [-1, 1] as an animated GIF of grids, one frame per time step,
    played at `fps` (0: DEFAULT_FPS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [image_grid(videos[:, :, f], prompts, **kw) for f in range(videos.shape[2])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=gif_durations(len(frames), fps), loop=0)
    return path


def gif_durations(frames: int, fps: float = 0.0) -> list[int]:
    """Display time in ms of each of `frames` frames played at `fps` (0: DEFAULT_FPS). GIF
    counts in 10 ms units, so each frame ends at its exact time rounded to those (8 fps: 120,
    130, 130, 120 ms: round() takes halves to even), not each lasting 1000 / fps rounded (120 ms: 8.33 fps, 24 fps played at 25)."""
    ends = [10 * round(100 * (i + 1) / (fps or DEFAULT_FPS)) for i in range(frames)]  # (F,) ms
    return [end - start for start, end in zip([0, *ends], ends)]


def save_grid(pixels: torch.Tensor, labels: Sequence[str], path: str | Path, fps: float = 0.0, **kw) -> Path:
    """Images (N, 3, H, W) as a PNG grid at `path`; clips (N, 3, F, H, W) as a GIF of grids
    beside it (`path` with the suffix .gif) at `fps` (0: DEFAULT_FPS)."""
    if pixels.dim() == 5:
        return save_video_grid(pixels, labels, Path(path).with_suffix(".gif"), fps, **kw)
    return save_image_grid(pixels, labels, path, **kw)


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 0.0) -> Path:
    """One video (3, F, H, W) in [-1, 1] as H.264 MP4 at `fps` (0: DEFAULT_FPS; even sizes
    padded by repetition), tagged BT.709 (`data_pipeline.color.encode_mp4`)."""
    from data_pipeline.color import encode_mp4

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video.movedim(1, 0))  # (F, H, W, 3)
    h, w = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, h - frames.shape[1]), (0, w - frames.shape[2]), (0, 0)), mode="edge")
    path.write_bytes(encode_mp4(frames, Fraction(fps or DEFAULT_FPS).limit_denominator(1001)))
    return path
