"""Colour profiles: pixels of images with an embedded ICC profile are converted to sRGB by
littlecms, as a colour-managed viewer shows them; sRGB and unusable profiles change nothing."""
from __future__ import annotations

import io
import struct

import numpy as np
import PIL.Image
import pytest
from PIL import ImageCms

from data_pipeline.color import to_srgb
from data_pipeline.config import DataConfig
from data_pipeline.decode import Jpeg, jpeg_metadata, open_image
from data_pipeline.transforms import TransformSpec, bucket_size, image_pixels

D50 = (0.9642, 1.0, 0.8249)
ADOBE_RGB = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))  # D50-adapted


def _xyz(values) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _matrix_profile(colorants=ADOBE_RGB, gamma: float = 563 / 256, note: bytes = b"") -> bytes:
    """An ICC v2 RGB display profile: colorant matrix and one gamma curve per channel (ICC.1
    sec. 7 and 10: the layout of Adobe RGB (1998)'s profile); `note` is a copyright text tag
    that makes it as large as wanted."""
    desc = b"desc\0\0\0\0" + struct.pack(">I", 10) + b"test rgb\0\0" + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(colorants[0])), (b"gXYZ", _xyz(colorants[1])),
            (b"bXYZ", _xyz(colorants[2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    if note:
        tags.append((b"cprt", b"text\0\0\0\0" + note + b"\0"))
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(24) + struct.pack(">I", 0)
              + b"".join(struct.pack(">i", round(v * 65536)) for v in D50) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def _image() -> np.ndarray:
    """48x32: colours over the whole cube, saturated ones included."""
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([x * 255 // 47, y * 255 // 31, (x * 7 + y * 13) % 256], -1).astype(np.uint8)


def _encode(rgb: np.ndarray, fmt: str, icc: bytes) -> bytes:
    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    PIL.Image.fromarray(rgb).save(buf, format=fmt, icc_profile=icc or None, **options)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    """The loader's pixels of a 48x32 image into a 48x32 bucket: no resampling."""
    assert bucket_size(40, 1.5) == (32, 48)
    spec = TransformSpec.from_config(DataConfig(shards="unused", resolution=40, aspect_buckets=[1.5]))
    return image_pixels(open_image(data), spec, (0.5, 0.5, 0.0)).frames[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixels_in_adobe_rgb_are_converted_to_srgb_as_littlecms_converts_them(fmt):
    profile = _matrix_profile()
    data = _encode(_image(), fmt, profile)
    stored = PIL.Image.open(io.BytesIO(data)).convert("RGB")  # PIL's decode: ours, bit for bit (test_data_jpeg)
    want = np.asarray(ImageCms.profileToProfile(stored, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                                ImageCms.createProfile("sRGB"), outputMode="RGB"))
    got = _pixels(data)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - np.asarray(stored)).max() > 20  # Adobe RGB's greens are far out of sRGB


@pytest.mark.parametrize("icc", [b"", ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
                                 _matrix_profile(gamma=2.2)[:200], b"not a profile at all"],
                         ids=["none", "srgb", "cut short", "garbage"])
def test_srgb_and_unusable_profiles_leave_the_pixels_as_they_are(icc):
    for fmt in ("JPEG", "PNG"):
        np.testing.assert_array_equal(_pixels(_encode(_image(), fmt, icc)), _pixels(_encode(_image(), fmt, b"")))
    pixels = _image()
    assert to_srgb(pixels, icc) is pixels  # not even converted: ~1 ms a 256 px image saved


def test_a_profile_in_several_app2_chunks_is_joined_as_pil_joins_it():
    """Profiles over 64 KiB are split over several APP2 segments (ICC.1 annex B.4)."""
    profile = _matrix_profile(note=b"x" * 150_000)
    data = _encode(_image(), "JPEG", profile)
    assert data.count(b"ICC_PROFILE\0") == 3
    img = open_image(data)
    assert isinstance(img, Jpeg) and img.icc == profile == PIL.Image.open(io.BytesIO(data)).info["icc_profile"]
    assert jpeg_metadata(data) == (1, profile)
