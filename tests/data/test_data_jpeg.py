"""JPEGs through libjpeg-turbo (simplejpeg): the pixels PIL's path gives, and PIL's decoder
wherever libjpeg-turbo cannot convert the colour space or flags the data."""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.decode import Jpeg, open_image
from data_pipeline.errors import SkipSample
from data_pipeline.transforms import TransformSpec, image_pixels, image_plan


def _jpeg(width: int, height: int, mode: str = "RGB", **save) -> bytes:
    """A smooth gradient with noise (real DCT content at every scale), saved as JPEG."""
    rng = np.random.default_rng(width * 7919 + height)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _spec(**over) -> TransformSpec:
    return TransformSpec.from_config(DataConfig(shards="unused", **over))


def _pil_path(data: bytes, spec: TransformSpec, u) -> tuple:
    """What the loader made before JPEGs went to libjpeg-turbo: PIL's image, drafted."""
    p = image_pixels(PIL.Image.open(io.BytesIO(data)), spec, u)
    return p.frames, p.frames_sr


CASES = [  # (width, height, mode, save options, config)
    (256, 256, "RGB", {}, {"resolution": 128}),  # exactly half: DCT scale 1/2, no resampling
    (500, 375, "RGB", {}, {"resolution": 128, "random_crop": True}),  # 1/2, then crop and resize
    (1024, 300, "RGB", {"progressive": True}, {"resolution": 64, "aspect_buckets": [0.5, 1.0, 2.0]}),
    (97, 61, "RGB", {"subsampling": 0}, {"resolution": 32}),  # 4:4:4, odd sizes
    (48, 40, "RGB", {}, {"resolution": 64}),  # smaller than the bucket: full size, upscaled
    (300, 200, "L", {}, {"resolution": 64}),  # grayscale
    (320, 320, "RGB", {}, {"resolution": 32, "sr_resolution": 128}),  # cascade pair: scale set by the sr size
]


@pytest.mark.parametrize("width,height,mode,save,over", CASES)
def test_a_jpeg_decodes_to_the_pixels_pils_path_gives(width, height, mode, save, over):
    data = _jpeg(width, height, mode, **save)
    img = open_image(data)
    assert isinstance(img, Jpeg) and img.size == (width, height)
    spec = _spec(**over)
    for u in ((0.5, 0.5, 0.5), (0.1, 0.9, 0.0)):
        got = image_pixels(img, spec, u)
        frames, frames_sr = _pil_path(data, spec, u)
        np.testing.assert_array_equal(got.frames, frames)
        if frames_sr is None:
            assert got.frames_sr is None
        else:
            np.testing.assert_array_equal(got.frames_sr, frames_sr)


def test_cmyk_jpegs_and_other_formats_go_to_pil():
    cmyk = _jpeg(64, 48, "CMYK")
    img = open_image(cmyk)
    assert isinstance(img, PIL.Image.Image) and img.mode == "CMYK"
    spec = _spec(resolution=32)
    np.testing.assert_array_equal(image_pixels(img, spec, (0.5, 0.5, 0.5)).frames,
                                  _pil_path(cmyk, spec, (0.5, 0.5, 0.5))[0])
    png = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    assert isinstance(open_image(png.getvalue()), PIL.Image.Image)  # a .jpg member holding a PNG


def _with_stray_bytes(data: bytes, marker: bytes) -> bytes:
    """Bytes before a marker: libjpeg warns "extraneous bytes before marker" (before the start
    of scan: while reading the header; before the end of image: while decoding) and decodes
    the image all the same, as PIL does."""
    at = data.rindex(marker)
    return data[:at] + b"\x00\x11\x22" + data[at:]


def test_a_jpeg_libjpeg_turbo_warns_about_goes_to_pil_which_keeps_or_skips_it():
    spec, u = _spec(resolution=64), (0.5, 0.5, 0.5)
    in_header = _with_stray_bytes(_jpeg(128, 128), b"\xff\xda")
    assert isinstance(open_image(in_header), PIL.Image.Image)
    in_scan = _with_stray_bytes(_jpeg(128, 128), b"\xff\xd9")
    img = open_image(in_scan)
    assert isinstance(img, Jpeg) and img.decode(64, 64) is None  # strict: the warning is an error
    for data in (in_header, in_scan):
        np.testing.assert_array_equal(image_pixels(open_image(data), spec, u).frames, _pil_path(data, spec, u)[0])

    good = _jpeg(128, 128)
    truncated = open_image(good[: len(good) // 2])
    assert isinstance(truncated, Jpeg)  # the header is intact: the scan is cut short
    with pytest.raises(SkipSample) as e:
        image_pixels(truncated, spec, u)
    assert e.value.reason == "corrupt_image"


def test_pils_decompression_bomb_limit_holds_for_jpegs(monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above twice the limit
    assert isinstance(open_image(_jpeg(40, 40)), Jpeg)  # 1,600 pixels: allowed
    for data in (_jpeg(64, 40), _jpeg(64, 40, "CMYK")):  # 2,560: refused, by us and by PIL
        with pytest.raises(SkipSample) as e:
            open_image(data)
        assert e.value.reason == "corrupt_image"


def _written(img, spec: TransformSpec, u) -> list[np.ndarray]:
    """What the loader writes into a batch's rows (1, h, w, 3) from an image's plan, the rows
    filled with a value no decoder writes everywhere first."""
    plan = image_plan(img, spec, u)
    rows = [np.full((1, *hw, 3), 7, np.uint8) for hw in plan.sizes]
    plan.write(rows)
    return rows


@pytest.mark.parametrize("width,height,mode,save,over", CASES)
def test_a_batch_row_gets_the_pixels_image_pixels_gives(width, height, mode, save, over):
    """The loader decodes an image only when its batch is collated, into the batch's row:
    the same pixels as decoding it on its own, whichever way it takes (in place or not)."""
    spec = _spec(**over)
    for u in ((0.5, 0.5, 0.5), (0.1, 0.9, 0.0)):
        img = open_image(_jpeg(width, height, mode, **save))
        want = image_pixels(img, spec, u)
        rows = _written(img, spec, u)
        np.testing.assert_array_equal(rows[0], want.frames)
        if want.frames_sr is not None:
            np.testing.assert_array_equal(rows[1], want.frames_sr)


def test_a_jpeg_at_the_buckets_size_times_a_dct_scale_is_decoded_into_its_row():
    spec, u = _spec(resolution=128), (0.5, 0.5, 0.5)
    assert image_plan(open_image(_jpeg(256, 256)), spec, u).in_place
    assert not image_plan(open_image(_jpeg(256, 200)), spec, u).in_place  # cropped, then resized
    assert not image_plan(open_image(_jpeg(256, 256)), _spec(resolution=128, sr_resolution=256), u).in_place
    img = open_image(_jpeg(256, 256))
    row = np.zeros((128, 128, 3), np.uint8)
    got = img.decode(128, 128, into=row)
    assert np.shares_memory(got, row) and row.any()
    with pytest.raises(ValueError, match="shape"):
        img.decode(128, 128, into=np.zeros((64, 64, 3), np.uint8))


def test_an_image_that_fails_in_place_is_decoded_by_pil_or_skipped():
    """libjpeg-turbo warns about stray bytes in the scan: PIL's decoder then keeps the image (the
    row gets PIL's pixels); a truncated scan is a SkipSample, as from `image_pixels`."""
    spec, u = _spec(resolution=64), (0.5, 0.5, 0.5)
    stray = _with_stray_bytes(_jpeg(128, 128), b"\xff\xd9")
    assert image_plan(open_image(stray), spec, u).in_place
    np.testing.assert_array_equal(_written(open_image(stray), spec, u)[0], _pil_path(stray, spec, u)[0])
    good = _jpeg(128, 128)
    with pytest.raises(SkipSample) as e:
        _written(open_image(good[: len(good) // 2]), spec, u)
    assert e.value.reason == "corrupt_image"


def test_only_jpegs_wait_for_their_batch_to_be_decoded():
    """The loader plans a JPEG from its header (decoded when its batch is collated); a PNG,
    which PIL loads whole to read its EXIF orientation, is decoded at once and not kept."""
    from data_pipeline.decode import Decoded
    from data_pipeline.errors import SkipCounter
    from data_pipeline.plan import Slot
    from data_pipeline.stages import Item, transform_stage
    from data_pipeline.transforms import ImagePlan, Pixels

    png = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(png, format="PNG")
    items = [Item(Slot(0, i, False, (0.5, 0.5, 0.5)), "shard", sample=Decoded(str(i), "c", {}, image=open_image(data)))
             for i, data in enumerate((_jpeg(64, 64), png.getvalue()))]
    jpeg, other = transform_stage(items, _spec(resolution=32), SkipCounter(1.0, 0, 0, "test"), defer=True)
    assert isinstance(jpeg.pixels, ImagePlan) and isinstance(other.pixels, Pixels)
    assert jpeg.sample.image is None and other.sample.image is None
