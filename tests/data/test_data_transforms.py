"""Transforms (buckets, cascade pairs, clips) and the synthetic shapes generator."""
from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from data_pipeline import synth
from data_pipeline.config import DataConfig
from data_pipeline.decode import open_image
from data_pipeline.stream import batch_to_device, build_stream
from data_pipeline.transforms import TransformSpec, bucket_size, image_pixels, resize_box
from tests.data.data_helpers import make_shards, take, valid_keys, write_manifest, write_tar


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _photo_like(width: int, height: int) -> np.ndarray:
    """Smooth structure (a bicubic enlargement of random colours) plus fine grain."""
    rng = np.random.default_rng(0)
    coarse = PIL.Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), PIL.Image.BICUBIC)).astype(int)
    return np.clip(smooth + rng.integers(-6, 6, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("box,hw,inside", [
    ((80, 0, 560, 480), (256, 256), 1),  # the centre square of a 4:3 photo, shrunk
    ((0, 0, 640, 480), (96, 128), 1),  # the whole image, shrunk 5x
    ((3, 7, 611, 461), (256, 336), 1),  # an off-centre box
    ((100, 50, 164, 98), (120, 160), 2),  # a small box, enlarged 2.5x
])
def test_resizing_gives_pils_antialiased_bicubic(box, hw, inside):
    rgb = _photo_like(640, 480)
    got = resize_box(rgb, box, *hw).astype(int)
    want = np.asarray(PIL.Image.fromarray(rgb).resize(hw[::-1], PIL.Image.BICUBIC, box=box)).astype(int)
    assert got.shape == (*hw, 3)
    diff = np.abs(got - want)
    assert diff[3:-3, 3:-3].max() <= inside  # at the edges PIL reads the pixels around the box
    assert diff.mean() < 0.1


def test_aspect_buckets_give_batches_of_one_bucket(tmp_path, cfg):
    shapes = [(64, 32), (32, 32), (32, 64)]  # (width, height): ratios 2, 1, 0.5
    samples = []
    for i in range(30):
        w, h = shapes[i * 7 % 3]
        samples.append({"__key__": f"{i:04d}_{w}x{h}", "png": _png(w, h, i), "txt": b"noise"})
    (tmp_path / "a").mkdir()
    write_tar(tmp_path / "a" / "shard-000000.tar", samples[:13])
    write_tar(tmp_path / "a" / "shard-000001.tar", samples[13:])
    write_manifest(tmp_path / "a")
    c = cfg(shards=str(tmp_path / "a"), aspect_buckets=[0.5, 1.0, 2.0], resolution=32, batch_size=3,
            bucket_window=5, num_workers=1)
    stream = build_stream(c, 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert sorted(valid_keys(batches)) == sorted(s["__key__"] for s in samples)
    sizes = {bucket_size(32, r) for r in (0.5, 1.0, 2.0)}
    matching = 0
    for b in batches:
        h, w = b["image"].shape[2:]
        assert (h, w) in sizes
        native = [tuple(int(v) for v in k.split("_")[1].split("x")) for k in b["__key__"]]
        matching += all((nw > nh) == (w > h) and (nw < nh) == (w < h) for nw, nh in native)
    windows = 2  # 10 batches in windows of 5: each window forces at most (buckets - 1) leftover batches
    assert matching >= len(batches) - 2 * windows and matching >= 6


def test_cascade_pairs_are_the_same_crop_at_two_sizes(cfg):
    stream = build_stream(cfg(sr_resolution=64, random_crop=True), 0, 1)
    b = batch_to_device(take(stream, 1)[0], torch.device("cpu"))
    assert b["image"].shape == (4, 3, 64, 64) and b["image_lr"].shape == (4, 3, 32, 32)
    down = torch.nn.functional.avg_pool2d(b["image"], 2)
    assert (down - b["image_lr"]).abs().mean() < 0.02


def test_video_clips_and_images_as_one_frame_clips(tmp_path, cfg):
    v = make_shards(tmp_path / "v", (4, 3), video=True, frames=6)
    im = make_shards(tmp_path / "i", (6,), start=100)
    stream = build_stream(cfg(shards=f"{v}::{im}", kind="video", num_frames=4, batch_size=2, bucket_window=4), 0, 1)
    batches = take(stream, stream.batches_per_epoch)
    assert len(valid_keys(batches)) == 13
    frames = []
    for b in batches:
        assert b["video"].shape[:2] == (2, 3) and b["video"].shape[3:] == (32, 32)
        frames.append(b["video"].shape[2])
        videos = [k < "000000100" for k in b["__key__"]]
        if all(videos):
            assert b["video"].shape[2] == 4
        if not any(videos):
            assert b["video"].shape[2] == 1
    assert set(frames) == {1, 4}


def test_short_videos_fall_into_shorter_frame_buckets(tmp_path, cfg):
    v = make_shards(tmp_path / "v", (4,), video=True, frames=6)
    c = cfg(shards=str(v), kind="video", num_frames=4, frame_stride=2, frame_buckets=[3], batch_size=2)
    b = take(build_stream(c, 0, 1), 1)[0]
    assert b["video"].shape == (2, 3, 3, 32, 32)  # 4 frames at stride 2 need 7; 3 need 5 of the 6


def test_a_resumed_stream_crops_like_the_uninterrupted_one(cfg):
    c = cfg(random_crop=True, sr_resolution=48, num_workers=2)
    reference = take(build_stream(c, 0, 1), 4)
    first = build_stream(c, 0, 1)
    take(first, 2)
    resumed = take(build_stream(c, 0, 1, state=first.state_dict()), 2)
    for a, b in zip(reference[2:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_lr"], b["image_lr"])


def test_synth_is_deterministic_and_captions_state_the_attributes():
    a, b = synth.synth_sample(7, seed=3), synth.synth_sample(7, seed=3)
    assert a == b
    meta = json.loads(a["json"])
    text = a["txt"].decode()
    assert text == synth.caption(meta) == meta["caption"]
    for s in meta["shapes"]:
        assert f"{s['size']} {s['color']} {s['shape']} {synth.POSITION_PHRASES[s['position']]}" in text
    assert 1 <= len(meta["shapes"]) <= 2
    assert len({s["color"] for s in meta["shapes"]}) == len(meta["shapes"])
    assert len({s["position"] for s in meta["shapes"]}) == len(meta["shapes"])


@pytest.mark.parametrize("index", range(12))
def test_synth_attributes_are_recoverable_from_pixels(index):
    attrs = synth.sample_attributes(np.random.default_rng([0, index]))
    size = 64
    image = synth.render_image(attrs, size)
    for s in attrs["shapes"]:
        x, y = synth.POSITIONS[s["position"]]
        assert tuple(image[int(y * size), int(x * size)]) == synth.COLORS[s["color"]]
        mask = (image == synth.COLORS[s["color"]]).all(-1)
        expected = synth.shape_mask(s["shape"], x, y, synth.SIZES[s["size"]], size)
        assert (mask == expected).all()
    colours = np.array(list(synth.COLORS.values()) + [synth.BACKGROUND], dtype=float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert distances[~np.eye(len(colours), dtype=bool)].min() > 100  # saturated and distinct
    small = synth.shape_mask("circle", 0.5, 0.5, synth.SIZES["small"], size).sum()
    large = synth.shape_mask("circle", 0.5, 0.5, synth.SIZES["large"], size).sum()
    assert large > 3 * small


@pytest.mark.parametrize("direction", list(synth.DIRECTIONS))
def test_synth_video_moves_in_the_stated_direction(direction):
    attrs = {"kind": "video", "shapes": [{"shape": "square", "color": "red", "size": "large",
                                          "position": synth._lane_start("centre", direction),
                                          "direction": direction}]}
    clip = synth.render_video(attrs, 64, 8)
    decoded = _decode_mp4(synth.encode_mp4(clip))
    assert decoded.shape == clip.shape
    centres = []
    for frame in decoded:
        ys, xs = np.nonzero(np.abs(frame.astype(int) - synth.COLORS["red"]).sum(-1) < 90)
        centres.append((xs.mean(), ys.mean()))
    dx, dy = np.subtract(centres[-1], centres[0])
    ux, uy = synth.DIRECTIONS[direction]
    assert dx * ux + dy * uy > 30 and abs(dx * uy - dy * ux) < 4
    assert f"moving {direction}" in synth.caption(attrs)


def _decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24", threads=1) for f in c.decode(video=0)])


def test_synth_is_fast():
    import time

    start = time.perf_counter()
    for i in range(500):
        synth.render_image(synth.sample_attributes(np.random.default_rng([0, i])), 64)
    assert time.perf_counter() - start < 2.0  # thousands of 64px images in seconds


@pytest.mark.parametrize("stop", [1, 3, 5])
def test_resume_inside_a_bucketing_window(tmp_path, cfg, stop):
    """Windows of 4 batches group by clip length; a resume inside one replays it from its start."""
    v = make_shards(tmp_path / "v", (4, 3), video=True, frames=6)
    im = make_shards(tmp_path / "i", (6,), start=100)
    c = cfg(shards=f"{v}::{im}", kind="video", num_frames=4, batch_size=2, bucket_window=4, num_workers=2)
    reference = take(build_stream(c, 0, 1), 8)
    first = build_stream(c, 0, 1)
    head = take(first, stop)
    tail = take(build_stream(c, 0, 1, state=first.state_dict()), 8 - stop)
    assert [b["__key__"] for b in head + tail] == [b["__key__"] for b in reference]
    assert [b["video"].shape for b in head + tail] == [b["video"].shape for b in reference]


def test_elastic_resume_with_buckets_serves_each_sample_once(tmp_path, cfg):
    """After a topology change inside a bucketing window, the samples its handed-out batches
    took (recorded in the state) are left out of the new plan: none is lost, none repeats."""
    v = make_shards(tmp_path / "v", (4, 3), video=True, frames=6)
    im = make_shards(tmp_path / "i", (6,), start=100)
    c = cfg(shards=f"{v}::{im}", kind="video", num_frames=4, batch_size=2, bucket_window=2)
    first = build_stream(c, 0, 1)
    seen = valid_keys(take(first, 3))
    after = [build_stream(c, r, 2, state=first.state_dict()) for r in range(2)]
    n = after[0]._job().segment.batches
    for s in after:
        seen += valid_keys(take(s, n))
    assert set(seen) == {f"{i:09d}" for i in range(7)} | {f"{i:09d}" for i in range(100, 106)}
    assert len(seen) == len(set(seen))


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped():
    """PIL's convert clips 16-bit grayscale at 255: the loader scales v to round(v / 257), so
    such a PNG gives what its 8-bit rendering gives."""
    wide = (np.arange(48 * 32).reshape(32, 48) * 42).astype(np.uint16)  # 0 .. 64470
    narrow = ((wide.astype(np.int64) + 128) // 257).astype(np.uint8)
    spec = TransformSpec.from_config(DataConfig(shards="unused", resolution=24, random_crop=True))
    for u in ((0.5, 0.5, 0.5), (0.0, 1.0, 0.0)):
        got = image_pixels(open_image(_encoded_png(wide)), spec, u).frames
        want = image_pixels(open_image(_encoded_png(narrow)), spec, u).frames
        np.testing.assert_array_equal(got, want)
    assert 100 < got.mean() < 155  # a gradient over the whole range, not clipped to white



def _encoded_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _over_white_by_pil(img: PIL.Image.Image) -> np.ndarray:
    white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
    return np.asarray(PIL.Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")).astype(int)


def test_transparent_images_are_composited_over_white():
    """RGBA, LA, and a palette with a transparent entry: transparent pixels become white
    whatever colour lies under them, opaque ones keep theirs, partial ones blend as PIL's
    alpha_composite over white does (within its rounding)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # the colours under the alpha: noise
    alpha = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (32, 1))
    alpha[:, :4], alpha[:, -4:] = 0, 255
    rgba = PIL.Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = PIL.Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    palette = PIL.Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 3
    spec = TransformSpec.from_config(DataConfig(shards="unused", resolution=40, aspect_buckets=[1.5]))
    for img in (rgba, la, palette):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        assert img.size == (48, 32) and bucket_size(40, 1.5) == (32, 48)  # no resampling
        got = image_pixels(open_image(buf.getvalue()), spec, (0.5, 0.5, 0.0)).frames[0].astype(int)
        want = _over_white_by_pil(PIL.Image.open(io.BytesIO(buf.getvalue())))
        assert np.abs(got - want).max() <= 1, img.mode
        seen = np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGBA"))
        np.testing.assert_array_equal(got[seen[..., 3] == 0], 255)
        np.testing.assert_array_equal(got[seen[..., 3] == 255], seen[..., :3][seen[..., 3] == 255])
    assert (np.asarray(palette) == 3).any()
