"""Safe decoding: pickles are never executed; bad members are skipped, counted, logged."""
from __future__ import annotations

import io
import json
import pathlib
import pickle
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageCms

from data_pipeline.config import DataConfig
from data_pipeline.decode import decode_npy, open_image
from data_pipeline.errors import DataError, SkipSample
from data_pipeline.stream import build_stream
from data_pipeline.synth import synth_sample
from data_pipeline.transforms import TransformSpec, image_pixels, video_pixels
from tests.data.data_helpers import TouchOnUnpickle, take, valid_keys, write_manifest, write_tar


def _object_npy(payload) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([payload], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _epoch(cfg) -> tuple[list[dict], object]:
    stream = build_stream(cfg, 0, 1)
    return take(stream, stream.batches_per_epoch), stream


def test_pickle_members_are_rejected_never_executed(tmp_path, cfg):
    marker = tmp_path / "EXECUTED"
    payload = pickle.dumps(TouchOnUnpickle(marker))
    pickle.loads(pickle.dumps(TouchOnUnpickle(tmp_path / "control")))  # the payload does work
    assert (tmp_path / "control").exists()
    samples = [synth_sample(i, size=32) for i in range(6)]
    for s in samples[:2]:
        s.update({"pyd": payload, "pkl": payload, "pth": payload})
    samples[2]["extra.npy"] = _object_npy(TouchOnUnpickle(marker))  # on a pixel sample: not read at all
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / "shard-000000.tar", samples)
    write_manifest(tmp_path / "d")
    batches, stream = _epoch(cfg(shards=str(tmp_path / "d"), batch_size=2))
    assert not marker.exists()
    stats = stream.stats()
    assert stats["rejected_unsafe_member"] == 6  # three members on each of two samples
    assert stats["ignored_member"] == 1 and stats["corrupt_array"] == 0
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for s in samples)
    with pytest.raises(SkipSample) as refused:  # a tensor member proper: the object array needs pickle
        decode_npy(_object_npy(TouchOnUnpickle(marker)))
    assert refused.value.reason == "corrupt_array" and not marker.exists()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_npy_members_of_any_byte_order_load_and_dtypes_without_a_tensor_are_skipped():
    """A big-endian array loads (in native order); strings, datetimes and records, which
    numpy loads without pickle but torch holds no tensor of, are a skipped sample: they raised
    TypeError out of the stream."""
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(decode_npy(_npy(values.astype(">f4"))), torch.from_numpy(values))
    for odd in (np.array(["a", "b"]), np.array(["2026-01-01"], dtype="datetime64[D]"),
                np.zeros(2, dtype=[("x", "<i4"), ("y", "<f4")])):
        with pytest.raises(SkipSample) as refused:
            decode_npy(_npy(odd))
        assert refused.value.reason == "corrupt_array", odd.dtype


def test_tensor_members_of_pixel_samples_are_ignored_and_counted(tmp_path, cfg):
    """Boxes of varying count on image samples (and a string tag on one): not the model's input,
    counted as ignored members; they stopped the run at the first batch (stacking failed) or
    raised out of the stream."""
    samples = [synth_sample(i, size=32) for i in range(6)]
    for i, s in enumerate(samples):
        s["boxes.npy"] = _npy(np.zeros((1 + i % 3, 4), np.float32))
    samples[4]["tags.npy"] = _npy(np.array(["circle"]))
    (tmp_path / "d").mkdir()
    write_tar(tmp_path / "d" / "shard-000000.tar", samples)
    write_manifest(tmp_path / "d")
    batches, stream = _epoch(cfg(shards=str(tmp_path / "d"), batch_size=2))
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for s in samples)
    assert all("boxes" not in b and "tags" not in b for b in batches)
    assert stream.stats()["ignored_member"] == 7


def _bad_dataset(directory: pathlib.Path) -> dict[str, str]:
    """Two shards with one bad sample of each kind and a truncated tail; returns key -> fate."""
    directory.mkdir()
    good = [synth_sample(i, size=32, image_format="jpg") for i in range(16)]
    fate = {s["__key__"]: "ok" for s in good}
    good[1]["jpg"] = good[1]["jpg"][: len(good[1]["jpg"]) // 2]
    fate[good[1]["__key__"]] = "corrupt_image"
    good[3]["txt"] = b"   "
    fate[good[3]["__key__"]] = "empty_caption"
    del good[5]["txt"]
    good[5]["json"] = json.dumps({"note": "no caption here"}).encode()
    fate[good[5]["__key__"]] = "missing_caption"
    good[6]["json"] = b"{not json"
    fate[good[6]["__key__"]] = "corrupt_json"
    write_tar(directory / "shard-000000.tar", good[:8])
    write_tar(directory / "shard-000001.tar", good[8:])
    write_manifest(directory)  # the manifest of the intact shard ...
    tar = directory / "shard-000001.tar"
    data = tar.read_bytes()
    cut = data.index(b"000000013.jpg") + 700  # ... then it is cut inside sample 13's image data
    tar.write_bytes(data[:cut])
    for i in (13, 14, 15):
        fate[f"{i:09d}"] = "truncated_tar"
    return fate


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_the_stream_goes_on(tmp_path, cfg, caplog, workers):
    fate = _bad_dataset(tmp_path / "bad")
    batches, stream = _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, num_workers=workers,
                                 error_budget=0.6))
    assert len(batches) == 4  # the planned count: bad samples leave invalid holes, not fewer batches
    assert sorted(valid_keys(batches)) == sorted(k for k, f in fate.items() if f == "ok")
    stats = stream.stats()
    expected = Counter(f for f in fate.values() if f != "ok")
    assert {r: stats[r] for r in expected} == dict(expected)
    assert stats["read"] == 16
    if workers == 0:  # worker processes log to their own stderr
        assert "000000001" in caplog.text and "shard-000000.tar" in caplog.text


def test_error_budget_stops_the_run_with_a_clear_message(tmp_path, cfg):
    fate = _bad_dataset(tmp_path / "bad")
    assert sum(f != "ok" for f in fate.values()) / len(fate) > 0.2
    with pytest.raises(DataError, match="error_budget"):
        _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, error_budget=0.2, min_errors_before_budget=8))


def test_error_budget_also_stops_worker_processes(tmp_path, cfg):
    _bad_dataset(tmp_path / "bad")
    with pytest.raises(Exception, match="error_budget"):
        _epoch(cfg(shards=str(tmp_path / "bad"), batch_size=4, num_workers=2, error_budget=0.0,
                   min_errors_before_budget=1))


def _media_with_metadata() -> dict[str, bytes]:
    """An image in each format with EXIF and an ICC profile (the segments parsed besides the
    pixels), and clips turned by a display matrix with non-square pixels."""
    rng = np.random.default_rng(0)
    img = PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    media = {}
    for fmt in ("JPEG", "PNG", "WEBP", "AVIF"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, exif=exif.tobytes(), icc_profile=icc)
        media[fmt] = buf.getvalue()
    for fmt, codec in (("mp4", "libx264"), ("matroska", "libx264")):
        buf = io.BytesIO()
        with av.open(buf, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=12, options={"g": "4"})
            stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
            stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
            stream.set_display_rotation(90)
            for _ in range(20):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(
                    rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), format="rgb24")))
            container.mux(stream.encode())
        media[fmt] = buf.getvalue()
    return media


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's, on the damaged EXIF blocks
def test_damaged_media_are_skipped_never_raised():
    """Bytes flipped in the headers and metadata (or anywhere in a clip), and files cut short:
    every outcome is pixels or a SkipSample, never another exception, which would end a loader
    worker and the run. (AVIF's decoder raised RuntimeError here before it was mapped.)"""
    rng = np.random.default_rng(1)
    image_spec = TransformSpec.from_config(DataConfig(shards="unused", resolution=32, aspect_buckets=[0.5, 1, 2]))
    video_spec = TransformSpec.from_config(DataConfig(shards="unused", kind="video", num_frames=4, frame_stride=2,
                                                      resolution=32, aspect_buckets=[0.5, 1, 2]))
    outcomes = Counter()
    for name, data in _media_with_metadata().items():
        video = name in ("mp4", "matroska")
        reach = len(data) if video else min(len(data), 1500)
        for trial in range(120):
            damaged = bytearray(data)
            for pos in rng.integers(2, reach, rng.integers(1, 6)):
                damaged[pos] = rng.integers(0, 256)
            if trial % 6 == 0:
                damaged = damaged[: rng.integers(64, len(data))]
            u = (0.5, 0.5, float(rng.random()))
            try:
                if video:
                    video_pixels(bytes(damaged), video_spec, u)
                else:
                    image_pixels(open_image(bytes(damaged)), image_spec, u)
                outcomes["decoded"] += 1
            except SkipSample as e:
                outcomes[e.reason] += 1
    assert outcomes["decoded"] > 0 and outcomes["corrupt_image"] > 0 and outcomes["corrupt_video"] > 0, outcomes
