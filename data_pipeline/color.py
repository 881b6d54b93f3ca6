"""Colours to sRGB: pixels of an image with an embedded ICC profile, as a viewer shows them.

A model learns, and later generates, sRGB values (what a browser assumes of untagged pixels).
Pixels stored in a wider space (Display P3 of phone photos, Adobe RGB of cameras) read as sRGB
look washed out: their saturated colours are stored as smaller values. Here they are converted
by littlecms (PIL's `ImageCms`) from the embedded profile to sRGB, perceptual intent, after the
crop is resized (a few hundred pixels a side: ~1 ms at 256 px, where converting the source
would cost its full size). Profiles that move no colour of a 16-level grid by more than 1 (sRGB
under any name, the usual case on the web) and profiles littlecms cannot use (CMYK or gray
profiles once the pixels are RGB, damaged ones) leave the pixels as they are.
"""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Optional

import numpy as np
import PIL.Image
from PIL import ImageCms

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LEVELS = np.linspace(0, 255, 16).round().astype(np.uint8)
_PROBE = np.stack(np.meshgrid(_LEVELS, _LEVELS, _LEVELS, indexing="ij"), -1).reshape(64, 64, 3)  # 4096 colours


def to_srgb(rgb: np.ndarray, icc: bytes) -> np.ndarray:
    """(H, W, 3) uint8 in sRGB from pixels in the space of the ICC profile `icc` (b"": already
    sRGB); the array itself where the profile changes nothing."""
    transform = _transform(icc) if icc else None
    if transform is None:
        return rgb
    return _apply(transform, rgb)


def _apply(transform: ImageCms.ImageCmsTransform, rgb: np.ndarray) -> np.ndarray:
    return np.asarray(ImageCms.applyTransform(PIL.Image.fromarray(np.ascontiguousarray(rgb)), transform))


@lru_cache(maxsize=64)
def _transform(icc: bytes) -> Optional[ImageCms.ImageCmsTransform]:
    """The transform from this profile to sRGB (built once per profile: ~2 ms), or None where
    it would change no colour or the profile is unusable for RGB pixels."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(source, _SRGB, "RGB", "RGB")
        moved = np.abs(_apply(transform, _PROBE).astype(np.int16) - _PROBE).max()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return transform if moved > 1 else None
