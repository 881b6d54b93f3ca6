"""Photos and phone videos train upright, as a viewer shows them: an image's EXIF orientation
as PIL's `ImageOps.exif_transpose` applies it (libjpeg-turbo's path and PIL's alike), a video
frame's display matrix as ffmpeg's autorotate applies it."""
from __future__ import annotations

import io
import json
import struct

import av
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.decode import Jpeg, jpeg_metadata, open_image
from data_pipeline.inspect_shards import inspect_shards
from data_pipeline.stream import build_stream
from data_pipeline.transforms import TransformSpec, image_pixels, upright, video_pixels
from data_pipeline.write import media_sample, write_shards

ORIENTATION = 0x0112


def _exif(orientation: int, extra: bool = True) -> bytes:
    ex = PIL.Image.Exif()
    if extra:  # entries before and after the orientation's in the directory
        ex[0x010F], ex[0x0110], ex[0x0131] = "Camera", "Model 1", "firmware"
    if orientation:
        ex[ORIENTATION] = orientation
    return ex.tobytes()


def _encode(rgb: np.ndarray, fmt: str, exif: bytes = b"") -> bytes:
    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    PIL.Image.fromarray(rgb).save(buf, format=fmt, exif=exif, **options)
    return buf.getvalue()


def _photo(width: int, height: int) -> np.ndarray:
    """Smooth structure that differs along both axes and between the corners."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (3 * x + y) % 256], -1)
    return rgb.astype(np.uint8)


def _pil_upright(data: bytes) -> np.ndarray:
    return np.asarray(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_pixels_as_pils_exif_transpose(orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 8, 3), dtype=np.uint8)
    png = _encode(stored, "PNG", _exif(orientation))
    np.testing.assert_array_equal(upright(stored, orientation), _pil_upright(png))


def _big_endian_exif(orientation: int) -> bytes:
    """An EXIF block in Motorola byte order ("MM"), as many cameras write it: PIL writes "II"."""
    entries = [(0x010F, 2, 4, b"Cam\0"), (ORIENTATION, 3, 1, struct.pack(">HH", orientation, 0))]
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", t, k, c) + v for t, k, c, v in entries)
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)


def _with_segment(jpeg: bytes, payload: bytes, marker: bytes = b"\xe1") -> bytes:
    """The JPEG with a segment (APP1 by default) inserted after its JFIF APP0 segment."""
    end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:end] + b"\xff" + marker + struct.pack(">H", len(payload) + 2) + payload + jpeg[end:]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's, on the directory cut short
def test_a_jpegs_orientation_is_read_as_pil_reads_it():
    plain = _encode(_photo(24, 16), "JPEG")
    cases = {"none": plain, "no orientation entry": _encode(_photo(24, 16), "JPEG", _exif(0))}
    cases.update({f"little-endian {o}": _encode(_photo(24, 16), "JPEG", _exif(o)) for o in range(1, 9)})
    cases.update({f"big-endian {o}": _with_segment(plain, _big_endian_exif(o)) for o in (3, 6, 8)})
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"  # also an APP1
    cases["after XMP and a comment"] = _with_segment(_with_segment(_with_segment(plain, _big_endian_exif(6)), xmp),
                                                     b"made by a camera", b"\xfe")
    cases["directory cut short"] = _with_segment(plain, _big_endian_exif(6)[:20])
    cases["out of range"] = _with_segment(plain, _big_endian_exif(9))
    for name, data in cases.items():
        expected = PIL.Image.open(io.BytesIO(data)).getexif().get(ORIENTATION, 1)
        got = jpeg_metadata(data)[0]
        assert got == (expected if 1 <= expected <= 8 else 1), name
        img = open_image(data)
        assert isinstance(img, Jpeg) and img.orientation == got, name
    assert [jpeg_metadata(cases[f"big-endian {o}"])[0] for o in (3, 6, 8)] == [3, 6, 8]
    assert jpeg_metadata(cases["after XMP and a comment"])[0] == 6


def _spec(**over) -> TransformSpec:
    return TransformSpec.from_config(DataConfig(shards="unused", **over))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_turned_photo_gives_the_pixels_of_the_upright_one(fmt, orientation):
    """A photo stored turned, with its orientation, is bucketed, cropped and resized exactly
    as the same photo stored upright: a portrait stored as landscape lands in a portrait
    bucket. (96x64 into buckets of ~72 px: no DCT reduction, so PIL's full decode of the
    JPEG is the reference.)"""
    stored = np.ascontiguousarray(_photo(96, 64))  # (64, 96, 3): landscape as stored
    data = _encode(stored, fmt, _exif(orientation))
    reference = _encode(_pil_upright(data), "PNG")  # the upright pixels, losslessly
    spec = _spec(resolution=72, aspect_buckets=[0.5, 2 / 3, 1.0, 1.5, 2.0], random_crop=True)
    for u in ((0.5, 0.5, 0.0), (0.1, 0.9, 0.0)):
        got = image_pixels(open_image(data), spec, u).frames
        want = image_pixels(open_image(reference), spec, u).frames
        np.testing.assert_array_equal(got, want)
    portrait = orientation >= 5
    assert (got.shape[1] > got.shape[2]) == portrait, got.shape


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_turned_jpeg_is_decoded_at_the_dct_scale_of_its_stored_size(orientation):
    """1024x256 stored, 256x1024 upright, into a 64x256 (w x h) bucket: the stored image is
    decoded at 1/4 scale (256x64, PIL's draft of the stored size) and only turned, not resized."""
    data = _encode(np.ascontiguousarray(_photo(1024, 256)), "JPEG", _exif(orientation))
    img = PIL.Image.open(io.BytesIO(data))
    img.draft("RGB", (256, 64))
    assert img.size == (256, 64)
    want = np.asarray(PIL.ImageOps.exif_transpose(img))
    got = image_pixels(open_image(data), _spec(resolution=128, aspect_buckets=[0.25, 1.0, 4.0]), (0.5, 0.5, 0.0))
    np.testing.assert_array_equal(got.frames[0], want)


def _lossless_mp4(frames: np.ndarray, rotation: int) -> bytes:
    """H.264 at qp 0 in 4:4:4 (decoded pixels depend on each pixel alone, so turning commutes
    with encoding), with a display matrix turning it `rotation` degrees counter-clockwise."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.set_display_rotation(rotation)
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_a_phone_video_stored_sideways_gives_the_pixels_of_the_upright_one(rotation):
    """Frames stored turned clockwise, with a display matrix turning them back (as a phone
    writes a portrait clip), give exactly what the same clip stored upright gives."""
    upright_clip = np.stack([np.roll(_photo(48, 80), 7 * i, axis=1) for i in range(4)])  # (4, 80, 48, 3): portrait
    stored = np.rot90(upright_clip, -rotation // 90, axes=(1, 2))
    spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, resolution=56,
                                                aspect_buckets=[0.6, 1.0, 1.67], random_crop=True))
    u = (0.2, 0.7, 0.0)
    got = video_pixels(_lossless_mp4(stored, rotation), spec, u).frames
    want = video_pixels(_lossless_mp4(upright_clip, 0), spec, u).frames
    np.testing.assert_array_equal(got, want)
    assert got.shape[0] == 4 and got.shape[1] > got.shape[2], got.shape  # a portrait bucket


def test_shards_of_turned_photos_are_inspected_and_batched_upright(tmp_path):
    """Through the whole loader: sideways-stored portraits (orientation 6 and 8) are reported
    as portraits by `dit data inspect` and batched in the portrait bucket, upright."""
    stored = np.ascontiguousarray(_photo(96, 64))
    samples = [{"__key__": f"s{o}", "jpg": _encode(stored, "JPEG", _exif(o)), "txt": b"a photo"} for o in (6, 8)]
    (tmp_path / "turned.jpg").write_bytes(samples[0]["jpg"])
    meta = json.loads(media_sample("turned", tmp_path / "turned.jpg", "a photo")["json"])  # `dit data write`
    assert (meta["width"], meta["height"]) == (64, 96)
    write_shards(samples, str(tmp_path / "d"), 10, progress=False)
    assert dict(inspect_shards(str(tmp_path / "d"), progress=False).resolutions) == {"64x96": 2}
    cfg = DataConfig(shards=str(tmp_path / "d"), resolution=72, aspect_buckets=[2 / 3, 1.5], batch_size=2,
                     num_workers=0, shuffle_buffer=1)
    batch = next(iter(build_stream(cfg, 0, 1)))
    want = {key: image_pixels(open_image(s["jpg"]), TransformSpec.from_config(cfg), (0.5, 0.5, 0.0)).frames[0]
            for key, s in zip(("s6", "s8"), samples)}
    for key, image in zip(batch["__key__"], batch["image"]):
        assert image.shape[1] > image.shape[2]  # (3, H, W): portrait
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), want[key])
