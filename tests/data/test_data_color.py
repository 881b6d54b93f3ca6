"""Colour profiles: pixels of images with an embedded ICC profile are converted to sRGB by
littlecms, as a colour-managed viewer shows them; sRGB and unusable profiles change nothing.
Video frames in BT.2020 primaries (an iPhone's HLG video) are converted to BT.709; PQ (HDR10)
video is refused."""
from __future__ import annotations

import io
import struct

import numpy as np
import PIL.Image
import pytest
from PIL import ImageCms

import av

from data_pipeline.color import BT2020_TO_BT709, bt2020_to_bt709, to_srgb
from data_pipeline.config import DataConfig
from data_pipeline.decode import Jpeg, jpeg_metadata, open_image
from data_pipeline.errors import SkipSample
from data_pipeline.inspect_shards import format_report, inspect_shards
from data_pipeline.transforms import TransformSpec, bucket_size, image_pixels, video_pixels
from data_pipeline.write import write_shards

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


# ITU-R BT.2087 eq. (1): linear BT.709 RGB -> linear BT.2020 RGB, as published (4 decimals)
BT2087_M = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])
PATCHES = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [200, 60, 30], [40, 120, 220],
                    [128, 128, 128], [20, 20, 20]], np.uint8)  # BT.709 signal: primaries, skin, sky, greys
SHOWN = np.tile(np.repeat(PATCHES[None], 8, 1), (32, 1, 1))  # (32, 64, 3): one patch per 8 columns


def _bt2020_clip(transfer: int, frames: int = 2) -> bytes:
    """SHOWN stored as BT.2020 would store it (BT.2087: BT.1886 linear light through M, 16 bits),
    in a lossless 10-bit 4:4:4 HEVC clip (Matroska) tagged BT.2020 primaries and matrix and
    the given transfer (18: HLG, 16: PQ)."""
    linear = (SHOWN / 255.0) ** 2.4 @ BT2087_M.T
    signal = np.round(linear ** (1 / 2.4) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        # one thread: with x265's frame threads the matroska muxer refused the flushed packets
        # (EINVAL) in ~2% of the clips
        params = "lossless=1:log-level=none:pools=none:frame-threads=1"
        stream = container.add_stream("libx265", rate=8, options={"x265-params": params})
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv444p10le"
        cc = stream.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace = 9, transfer, 9
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(signal, format="rgb48le")
            frame = frame.reformat(format="yuv444p10le", dst_colorspace=9, threads=1)  # BT.2020's matrix
            frame.color_primaries, frame.color_trc, frame.colorspace = 9, transfer, 9
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _linear(rgb: np.ndarray) -> np.ndarray:
    return (rgb / 255.0) ** 2.4


def test_the_primaries_matrix_inverts_bt2087():
    np.testing.assert_allclose(BT2020_TO_BT709 @ BT2087_M, np.eye(3), atol=2e-4)
    np.testing.assert_array_equal(bt2020_to_bt709(PATCHES[6:]), PATCHES[6:])  # greys stay


def test_hlg_video_in_bt2020_is_seen_in_bt709_colours():
    """Read as BT.709, the BT.2020 signal of pure red is (211, 84, 46); converted, the clip shows
    the colours it was made from. The 8-bit signal before the matrix leaves a few levels where
    the gamma is steep (a blue of (0, 9, 255) for (0, 0, 255), 43 for 40): less light than one
    8-bit step at full scale (0.0094)."""
    data = _bt2020_clip(transfer=18)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=2, resolution=45,
                                                aspect_buckets=[2.0]))
    assert bucket_size(45, 2.0) == (32, 64)
    got = video_pixels(data, spec, (0.5, 0.5, 0.0)).frames
    with av.open(io.BytesIO(data)) as container:
        as_stored = next(container.decode(video=0)).to_ndarray(format="rgb24", threads=1)
    assert np.abs(_linear(as_stored) - _linear(SHOWN)).max() > 0.3  # what the loader gave before
    assert got.shape == (2, 32, 64, 3)
    assert np.abs(_linear(got) - _linear(SHOWN)).max() < 0.0094
    assert np.abs(got.astype(int) - SHOWN).max() <= 10


def test_pq_video_is_refused_and_inspect_reports_hdr(tmp_path):
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=2, resolution=32))
    with pytest.raises(SkipSample, match="tone mapping") as e:
        video_pixels(_bt2020_clip(transfer=16), spec, (0.5, 0.5, 0.0))
    assert e.value.reason == "hdr_video"
    samples = [{"__key__": "pq", "mkv": _bt2020_clip(16), "txt": b"a"},
               {"__key__": "hlg", "mkv": _bt2020_clip(18), "txt": b"b"}]
    write_shards(samples, str(tmp_path / "v"), 10, progress=False)
    report = inspect_shards(str(tmp_path / "v"), progress=False)
    assert dict(report.hdr) == {"HLG": 1, "PQ": 1}
    assert "PQ 1 (refused" in format_report(report)


def _untagged_clip(width: int, height: int, matrix: int) -> bytes:
    """PATCHES side by side over a width x height frame, made YUV with the H.273 `matrix` (1:
    BT.709, 5: BT.601) as an encoder of that size makes it, in a lossless 4:4:4 FFV1 clip
    (Matroska) that does not say which matrix it used."""
    shown = np.repeat(PATCHES, -(-width // len(PATCHES)), 0)[:width][None].repeat(height, 0)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(shown), format="rgb24")
            container.mux(stream.encode(frame.reformat(format="yuv444p", dst_colorspace=matrix, threads=1)))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("width, height, matrix", [(1280, 720, 1), (640, 480, 5)], ids=["hd-bt709", "sd-bt601"])
def test_untagged_video_is_read_with_the_matrix_a_player_assumes_for_its_size(width, height, matrix):
    """An HD stream that names no matrix is BT.709, an SD one BT.601 (mpv's and libplacebo's
    guess); FFmpeg's default is BT.601 at every size: the red of untagged HD video came out
    (233, 0, 2)."""
    data = _untagged_clip(width, height, matrix)
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        assert frame.colorspace == 2  # unspecified
        ffmpeg_default = frame.to_ndarray(format="rgb24", threads=1)
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=2, resolution=64,
                                                aspect_buckets=[width / height]))
    got = video_pixels(data, spec, (0.5, 0.5, 0.0)).frames  # (2, h, w, 3), patches resized alike
    h, w = got.shape[1:3]
    centres = (np.arange(len(PATCHES)) + 0.5) / len(PATCHES)  # of each patch, as a fraction of the width
    assert np.abs(got[:, h // 2, (centres * w).astype(int)].astype(int) - PATCHES).max() <= 2
    stored = ffmpeg_default[height // 2, (centres * width).astype(int)]
    assert (np.abs(stored.astype(int) - PATCHES).max() > 20) == (matrix == 1)


@pytest.mark.parametrize("size", [256, 640], ids=["sd", "hd"])
def test_the_mp4s_we_write_read_back_in_their_colours_at_every_size(tmp_path, size):
    """Sampled clips (`save_mp4`) and synthetic shards (`encode_mp4`) name BT.709 in the stream
    and are read with it: untagged BT.601, as swscale makes it by default, read back at 640 px
    (as every player reads HD) as green (0, 215, 0) and skin (228, 172, 101)."""
    import torch

    from data_pipeline.synth import encode_mp4
    from trainer.media import save_mp4

    shown = np.repeat(PATCHES, -(-size // len(PATCHES)), 0)[:size][None].repeat(size, 0)  # (H, W, 3)
    clip = np.ascontiguousarray(np.stack([shown] * 2))  # (F, H, W, 3)
    video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, H, W) in [-1, 1]
    written = {"synth": encode_mp4(clip), "sample": save_mp4(video, tmp_path / "clip.mp4").read_bytes()}
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=2, resolution=size))
    centres = ((np.arange(len(PATCHES)) + 0.5) / len(PATCHES) * size).astype(int)
    for name, data in written.items():
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            assert (frame.colorspace, frame.color_primaries, frame.color_trc, frame.color_range) == (1, 1, 1, 1), name
        got = video_pixels(data, spec, (0.5, 0.5, 0.0)).frames  # (2, size, size, 3)
        assert np.abs(got[:, size // 2, centres].astype(int) - PATCHES).max() <= 3, name
