"""Colours to sRGB: pixels of an image with an embedded ICC profile, and video frames in BT.2020
primaries, as a viewer shows them.

A model learns, and later generates, sRGB values (what a browser assumes of untagged pixels).
Pixels stored in a wider space (Display P3 of phone photos, Adobe RGB of cameras) read as sRGB
look washed out: their saturated colours are stored as smaller values. Here they are converted
by littlecms (PIL's `ImageCms`) from the embedded profile to sRGB, perceptual intent, after the
crop is resized (a few hundred pixels a side: ~1 ms at 256 px, where converting the source
would cost its full size). Profiles that move no colour of a 16-level grid by more than 1 (sRGB
under any name, the usual case on the web) and profiles littlecms cannot use (CMYK or gray
profiles once the pixels are RGB, damaged ones) leave the pixels as they are.

Video frames tagged with BT.2020 primaries (HDR from phones: an iPhone records HLG in BT.2020
by default; also wide-gamut SDR) read as BT.709 look washed out the same way. Their colours are
converted to BT.709 after the resize (`bt2020_to_bt709`). An HLG signal is taken as the SDR
signal it was designed to be compatible with (ITU-R BT.2100: shown as is on an SDR display with
BT.2020 colours), and its highlights stay compressed by the HLG curve itself. PQ video (HDR10)
has no such reading: without tone mapping its frames are dark and flat, so it is refused
(`hdr_video`); convert it with ffmpeg first (zscale and tonemap).

Video whose stream does not say which matrix its YUV was made with is converted with the one a
player assumes (`yuv_matrix`): BT.709 for HD, BT.601 for SD. FFmpeg's own default is BT.601 at
every size, which turns the red of untagged HD video (BT.709, as an HD encoder makes it) into
(233, 0, 2) and its green into (20, 255, 9). The MP4s this project writes (`encode_mp4`:
synthetic shards, sampled clips) say which they use.
"""
from __future__ import annotations

import io
from fractions import Fraction
from functools import lru_cache
from typing import Optional, Union

import av
import numpy as np
import PIL.Image
from PIL import ImageCms

# H.273 codes as FFmpeg reports them (frame.color_primaries, frame.color_trc)
BT2020_PRIMARIES = 9
PQ_TRANSFER = 16  # SMPTE ST 2084
HLG_TRANSFER = 18  # ARIB STD-B67
BT709 = 1  # H.273's code for BT.709 as matrix (frame.colorspace), primaries and transfer alike
UNSPECIFIED_MATRIX = 2
LIMITED_RANGE = 1  # frame.color_range: "MPEG" (16-235)

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


def _rgb_to_xyz(primaries: tuple[tuple[float, float], ...], white: tuple[float, float]) -> np.ndarray:
    """The linear RGB -> CIE XYZ matrix of a colour space given by its primaries' and white
    point's xy chromaticities (SMPTE RP 177: white (1, 1, 1) to the white point at Y = 1)."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T  # columns: R, G, B at Y = 1
    wx, wy = white
    scale = np.linalg.solve(xyz, np.array([wx / wy, 1.0, (1 - wx - wy) / wy]))
    return xyz * scale


_D65 = (0.3127, 0.3290)
_BT709 = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))  # ITU-R BT.709, table 1.3
_BT2020 = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))  # ITU-R BT.2020, table 3
# linear BT.2020 RGB -> linear BT.709 RGB (the inverse of ITU-R BT.2087's matrix M; row 0:
# 1.6605, -0.5876, -0.0728)
BT2020_TO_BT709 = (np.linalg.inv(_rgb_to_xyz(_BT709, _D65)) @ _rgb_to_xyz(_BT2020, _D65)).astype(np.float32)
_GAMMA = 2.4  # ITU-R BT.1886's display gamma: signal <-> linear light, as BT.2087 converts
_TO_LINEAR = ((np.arange(256) / 255.0) ** _GAMMA).astype(np.float32)  # 8-bit signal -> linear
_SQRT_STEPS = 65535
_FROM_SQRT = np.round(255 * (np.arange(_SQRT_STEPS + 1) / _SQRT_STEPS) ** (2 / _GAMMA)).astype(np.uint8)


def bt2020_to_bt709(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 signal in BT.2020 primaries -> the same colours in BT.709 primaries:
    linear light by BT.1886's gamma, the primaries' matrix, colours outside BT.709 clipped
    (ITU-R BT.2407's clipping), gamma again. Linear light goes back to 8 bits through its
    square root (a 65536-entry table: even the darkest step keeps its level)."""
    linear = _TO_LINEAR[rgb] @ BT2020_TO_BT709.T
    np.clip(linear, 0.0, 1.0, out=linear)
    return _FROM_SQRT[(np.sqrt(linear) * _SQRT_STEPS + 0.5).astype(np.int32)]


def yuv_matrix(frame) -> Optional[int]:
    """The H.273 matrix to convert a video frame's YUV to RGB with: the one its stream names,
    else BT.709 for HD (at least 1280 wide or over 576 high) and BT.601 (FFmpeg's default,
    None) for SD, as mpv and libplacebo guess it (`pl_color_system_guess_ycbcr`). None too for
    RGB-coded frames, which have no matrix."""
    if frame.colorspace != UNSPECIFIED_MATRIX or frame.format.is_rgb:
        return None
    return BT709 if frame.width >= 1280 or frame.height > 576 else None


def encode_mp4(frames: np.ndarray, fps: Union[int, Fraction], **options: str) -> bytes:
    """H.264 MP4 bytes of a (F, H, W, 3) uint8 sRGB clip (H and W even), in limited-range BT.709
    YUV 4:2:0 and tagged so (matrix, primaries, transfer: ITU-R BT.709) in the stream and every
    frame; `options` are libx264's (crf, preset, ...). swscale's default is BT.601 untagged,
    which players, and this loader (`yuv_matrix`), read as BT.709 over 576 px high or from 1280
    wide: pure green written at 640 px came back as (0, 215, 0)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = options
        ctx = stream.codec_context
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = BT709
        ctx.color_range = LIMITED_RANGE
        for frame in frames:
            rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
            yuv = rgb.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG",
                               dst_color_trc=BT709, dst_color_primaries=BT709, threads=1)  # see open_video
            container.mux(stream.encode(yuv))
        container.mux(stream.encode())
    return buf.getvalue()
