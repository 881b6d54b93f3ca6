"""Pixel transforms: resize + crop into area x aspect buckets, cascade pairs, video clips.

Buckets: for each pixel area (`data.resolutions`, or the single `data.resolution`) one (h, w)
per aspect ratio of `data.aspect_buckets`. A sample goes to the largest area not above its
own pixel area (the smallest area when it is below all: images are upscaled only then), and
within that area to the ratio nearest its own in log space (SDXL, Podell et al. 2023, sec.
2.3; PixArt-alpha). The choice depends on the image size only, so a resumed stream buckets
exactly as the uninterrupted one did.

Every sample becomes `Pixels` (or, a JPEG in the loader, an `ImagePlan` that writes them into
its batch): uint8 frames (F, H, W, 3) at its bucket's size, plus the same crop at the
super-resolution size when cascade pairs are asked for. Images are 1-frame clips. Channels
stay last, as PIL and PyAV deliver them: the batch is (B, 3, F, H, W) over that memory and the
device makes it contiguous while normalising (`batch_to_device`). The crop position and the
clip start come from per-sample random numbers supplied by the planner, so a resumed stream
crops exactly as the uninterrupted one did.
Images are turned upright by their EXIF orientation first (`upright`), video frames by their
display matrix (`upright_frame`), so buckets, crops and pixels are those of what a viewer shows.
JPEGs are decoded at a reduced DCT scale when the output is much smaller (the scale of PIL's
`draft`), which is most of the speed of the loader on large images, by libjpeg-turbo (decode.py's
`Jpeg`). The loader plans a JPEG from its header (`image_plan`) and decodes it when its batch
is collated, straight into the batch's memory where the decoded pixels already are the output.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import av
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from data_pipeline.config import DataConfig, bucket_areas, bucket_ratios, bucket_sizes
from data_pipeline.config import bucket_size  # noqa: F401  (re-exported: the buckets' rounding, computed there)
from data_pipeline.color import BT2020_PRIMARIES, PQ_TRANSFER, bt2020_to_bt709, to_srgb, yuv_matrix
from data_pipeline.decode import Jpeg, icc_profile, orientation, upright_size
from data_pipeline.errors import SkipSample

_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class TransformSpec:
    """What the pixel stage produces, derived from DataConfig."""

    sizes: tuple[tuple[int, int], ...]  # (h, w) per bucket: area-major, then aspect ratio
    sr_sizes: Optional[tuple[tuple[int, int], ...]]  # same buckets at sr_resolution, or None
    ratios: tuple[float, ...]  # width / height of each bucket within an area
    frame_counts: tuple[int, ...]  # allowed clip lengths, ascending; (1,) in image mode
    frame_stride: int
    random_crop: bool
    kind: str = "image"  # image: batches hold (B, 3, H, W); video: (B, 3, F, H, W)
    areas: tuple[int, ...] = (0,)  # square sides of the pixel areas, ascending
    fps: float = 0.0  # clips sampled at this rate whatever the source's; 0: every frame_stride-th frame

    def stride(self, rate) -> float:
        """Source frames from one clip frame to the next: `frame_stride`, or with `fps` the
        source's rate over it (30 fps sampled at 8: 3.75; a source slower than `fps` gives
        strides below 1, its frames repeated)."""
        if not self.fps:
            return self.frame_stride
        if not rate:
            raise SkipSample("corrupt_video", f"no frame rate in the stream to sample clips at data.fps={self.fps:g}")
        return float(rate) / self.fps

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "TransformSpec":
        ratios, areas = bucket_ratios(cfg), bucket_areas(cfg)
        sizes, sr_sizes = bucket_sizes(cfg)
        counts = (1,) if cfg.kind == "image" else tuple(sorted({1, cfg.num_frames, *cfg.frame_buckets}))
        return cls(sizes, sr_sizes, ratios, counts, cfg.frame_stride, cfg.random_crop, cfg.kind, areas, cfg.fps)

    def bucket(self, width: int, height: int) -> int:
        """Index into `sizes` of a width x height source: its area, then its aspect ratio."""
        return _bucket_index(width, height, self.areas, self.ratios)

    @property
    def bucketed(self) -> bool:
        """Whether samples can fall into different buckets (then batches are grouped)."""
        return len(self.sizes) > 1 or len(self.frame_counts) > 1


@dataclass
class Pixels:
    """uint8 pixels (F, H, W, 3): the memory layout of the batch, so collating only copies."""

    frames: np.ndarray  # at the base resolution bucket
    frames_sr: Optional[np.ndarray]  # (F, H', W', 3), same crop at the sr size, or None

    @property
    def bucket(self) -> tuple[int, int, int]:
        return self.frames.shape[0:3]

    @property
    def sr_hw(self) -> Optional[tuple[int, int]]:
        return None if self.frames_sr is None else self.frames_sr.shape[1:3]

    def write(self, rows: list[np.ndarray]) -> None:
        """Into a batch's rows (F', h, w, 3) (the base size, then the sr size): the clip forced
        into them (`refit`) where their length or size is another bucket's."""
        for row, frames in zip(rows, (self.frames, self.frames_sr)):
            np.copyto(row, refit(frames, row.shape[0], row.shape[1:3]))


@lru_cache(maxsize=4096)
def _bucket_index(width: int, height: int, areas: tuple[int, ...], ratios: tuple[float, ...]) -> int:
    """Cached per source size: datasets hold few distinct sizes, and each sample asked anew."""
    return area_index(width, height, areas) * len(ratios) + nearest_bucket(width, height, ratios)


def area_index(width: int, height: int, sides: tuple[int, ...]) -> int:
    """Index of the largest area side**2 (sides ascending) not above width * height; 0 when
    the source is smaller than all of them."""
    fitting = [i for i, side in enumerate(sides) if side * side <= width * height]
    return fitting[-1] if fitting else 0


def nearest_bucket(width: int, height: int, ratios: tuple[float, ...]) -> int:
    """Index of the bucket whose aspect ratio is closest in log space."""
    r = math.log(width / height)
    return min(range(len(ratios)), key=lambda i: abs(math.log(ratios[i]) - r))


def crop_box(width: int, height: int, out_w: int, out_h: int, random_crop: bool, u: tuple[float, float]):
    """Largest box of the output's aspect inside the source: centred, or placed by u in [0,1)^2."""
    scale = min(width / out_w, height / out_h)
    bw, bh = out_w * scale, out_h * scale
    fx, fy = (u[0], u[1]) if random_crop else (0.5, 0.5)
    left, top = (width - bw) * fx, (height - bh) * fy
    return left, top, left + bw, top + bh


def rgb_array(img: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded RGB image: one pack of PIL's pixels, no further copy."""
    w, h = img.size
    return np.frombuffer(img.tobytes(), np.uint8).reshape(h, w, 3)


def decode_rgb(img: Union[Jpeg, PIL.Image.Image], width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 of an opened image, a JPEG decoded at the smallest DCT scale that
    leaves at least width x height (PIL's `draft`; other formats at full size). A JPEG through
    libjpeg-turbo lands in its array directly; through PIL it is packed once more."""
    if isinstance(img, Jpeg):
        rgb = img.decode(width, height)
        if rgb is not None:
            return rgb
        img = img.pil()
    img.draft("RGB", (width, height))
    try:
        img.load()
    except RuntimeError as e:  # how libavif's decoder (AVIF) reports corrupt data
        raise OSError(str(e)) from None
    if img.mode in _WIDE_GRAY:
        return _gray_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _over_white(img)
    if img.mode != "RGB":  # a JPEG drafted in RGB is decoded as RGB: no converting copy
        img = img.convert("RGB")
    return rgb_array(img)


# PIL's modes of 16-bit grayscale PNGs (by Pillow version and byte order): its `convert`
# clips their values at 255 (a 16-bit photo becomes nearly white) instead of scaling them
_WIDE_GRAY = frozenset(("I;16", "I;16L", "I;16B", "I;16N", "I"))
_ALPHA_MODES = frozenset(("RGBA", "LA", "PA", "RGBa", "La"))  # PNGs and WebPs with an alpha channel


def _over_white(img: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of an image with transparency (an alpha channel, or a transparent colour
    or palette entry) composited over white, as img2dataset mats the images it downloads:
    `convert("RGB")` would keep whatever colours lie under the transparent pixels (black, or
    leftovers an optimiser chose), e.g. the background of every logo."""
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # at most 65152: no overflow


def _gray_rgb(img: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a 16-bit grayscale image: each value v scaled to round(v / 257)."""
    wide = np.asarray(img).astype(np.int64)
    gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


# EXIF orientation -> (transpose, flip rows, flip columns), in that order: the stored pixels
# turned as PIL's `ImageOps.exif_transpose` turns them (TIFF 6.0, tag 274)
_UPRIGHT = {1: (False, False, False), 2: (False, False, True), 3: (False, True, True),
            4: (False, True, False), 5: (True, False, False), 6: (True, False, True),
            7: (True, True, True), 8: (True, True, False)}


def upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, 3) stored pixels as they are meant to be seen, for an EXIF orientation 1-8: a
    view (strided, no copy); the resize copies what it reads anyway."""
    transpose, flip_rows, flip_cols = _UPRIGHT[orientation]
    if transpose:
        rgb = rgb.transpose(1, 0, 2)
    return rgb[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _fit(rgb: np.ndarray, box, sizes_hw: list[tuple[int, int]]) -> list[np.ndarray]:
    """Resize the box of an (H, W, 3) uint8 image to each (h, w), as (h, w, 3): the array
    itself, not a copy, where it already is the box at that size."""
    out = []
    for h, w in sizes_hw:
        exact = rgb.shape[:2] == (h, w) and max(abs(box[0]), abs(box[1]), abs(box[2] - w), abs(box[3] - h)) < 1e-3
        out.append(rgb if exact else resize_box(rgb, box, h, w))
    return out


def resize_box(rgb: np.ndarray, box, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 of the box (left, top, right, bottom) of an (H, W, 3) uint8 image, box
    rounded to whole pixels: antialiased bicubic, PIL's filter (Keys' cubic with a = -0.5, its
    support widened by the scale when shrinking), by torch's vectorised uint8 kernel. PIL's own
    resampling is scalar C: 2.2 ms against 0.3 for a 480 px box to 256 px on the loader bench's
    machine. Away from the box's edges the values are PIL's within 1 when shrinking, 2 when
    enlarging; at the edges PIL reads the pixels around the box where torch repeats the edge
    (up to 2 apart when shrinking, 6 when enlarging a small box, measured on a photo-like image)."""
    left, top = round(box[0]), round(box[1])
    right, bottom = max(round(box[2]), left + 1), max(round(box[3]), top + 1)
    crop = rgb[top:bottom, left:right]
    if not (crop.flags.c_contiguous and crop.flags.writeable):
        crop = crop.copy()  # the kernel reads whole rows; a tensor wants memory it may write
    ch, cw = crop.shape[:2]
    x = torch.from_numpy(crop).as_strided((1, 3, ch, cw), (ch * cw * 3, 1, cw * 3, 3))  # channels last
    y = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True)  # (1, 3, h, w), channels last
    return y[0].permute(1, 2, 0).numpy()


def _out_sizes(spec: TransformSpec, bucket: int) -> list[tuple[int, int]]:
    sizes = [spec.sizes[bucket]]
    if spec.sr_sizes is not None:
        sizes.append(spec.sr_sizes[bucket])
    return sizes


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """An opened image's way into its bucket, worked out from its header alone: the loader
    groups samples by `bucket` and decodes each only when its batch is collated, into the
    batch's memory (`write`). A JPEG whose decoded pixels already are the output (stored
    upright at the bucket's aspect, no colour profile, a DCT scale landing on the bucket's
    size: shards written at the training size) is decoded there by libjpeg-turbo and nothing
    else is done to it."""

    img: Union[Jpeg, PIL.Image.Image]
    turn: int  # EXIF orientation
    size: tuple[int, int]  # (width, height) upright
    box: tuple[float, float, float, float]  # the crop, in upright source pixels
    sizes: tuple[tuple[int, int], ...]  # (h, w): the bucket's, then its sr size
    need: tuple[int, int]  # (width, height) to decode at least (as stored)
    in_place: bool  # a JPEG whose decoded pixels are the output

    @property
    def bucket(self) -> tuple[int, int, int]:
        return (1, *self.sizes[0])

    @property
    def sr_hw(self) -> Optional[tuple[int, int]]:
        return self.sizes[1] if len(self.sizes) > 1 else None

    def arrays(self) -> list[np.ndarray]:
        """(h, w, 3) uint8 at each size: decoded at the scale needed, turned upright, cropped
        and resized, in sRGB where the image has a colour profile (color.py)."""
        width, height = self.size
        box = self.box
        try:
            rgb = upright(decode_rgb(self.img, *self.need), self.turn)
            sx, sy = rgb.shape[1] / width, rgb.shape[0] / height
            out = _fit(rgb, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), list(self.sizes))
            icc = icc_profile(self.img)
            return [to_srgb(a, icc) for a in out]
        except _PIL_ERRORS as e:
            raise SkipSample("corrupt_image", str(e)) from None

    def write(self, rows: list[np.ndarray]) -> None:
        """Into a batch's rows (F', h, w, 3) (the base size, then the sr size); SkipSample
        where the image cannot be decoded."""
        if any(row.shape[:3] != (1, *hw) for row, hw in zip(rows, self.sizes)):  # a leftover batch of another bucket
            Pixels(*self.pixels()).write(rows)
        elif not (self.in_place and self.img.decode(*self.need, into=rows[0][0]) is not None):
            for row, a in zip(rows, self.arrays()):  # (libjpeg-turbo's warnings: PIL decides, in `arrays`)
                np.copyto(row[0], a)

    def pixels(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(1, h, w, 3) at the bucket's size, and at its sr size or None."""
        out = self.arrays()
        return out[0][None], out[1][None] if len(out) > 1 else None


def image_plan(img: Union[Jpeg, PIL.Image.Image], spec: TransformSpec, u: tuple[float, float, float]) -> ImagePlan:
    """The bucket, sizes, crop and decoding scale of an opened image (nothing decoded)."""
    turn = orientation(img)
    width, height = upright_size(img.size, turn)
    sizes = tuple(_out_sizes(spec, spec.bucket(width, height)))
    big_h, big_w = sizes[-1]
    box = crop_box(width, height, big_w, big_h, spec.random_crop, u[:2])
    k = max(big_w / (box[2] - box[0]), big_h / (box[3] - box[1]))
    need = upright_size((math.ceil(width * k), math.ceil(height * k)), turn)
    in_place = (isinstance(img, Jpeg) and turn == 1 and not img.icc and len(sizes) == 1
                and img.decoded_shape(*need) == (big_h, big_w, 3) and _whole(box, width, height))
    return ImagePlan(img, turn, (width, height), box, sizes, need, in_place)


def _whole(box, width: int, height: int) -> bool:
    """Whether a crop box is the whole image, to `_fit`'s tolerance (in source pixels, which a
    reduced DCT scale only shrinks): then `_fit` keeps the decoded array as it is."""
    return max(abs(box[0]), abs(box[1]), abs(box[2] - width), abs(box[3] - height)) < 1e-3


def image_pixels(img: Union[Jpeg, PIL.Image.Image], spec: TransformSpec, u: tuple[float, float, float]) -> Pixels:
    """Decode an opened image at the scale needed for its bucket, turn it upright, crop and
    resize, and convert the result to sRGB where it has a colour profile (color.py)."""
    return Pixels(*image_plan(img, spec, u).pixels())


def choose_clip(num_available: int, counts: tuple[int, ...], stride: float, u: float) -> tuple[int, int]:
    """(frames, start): the longest allowed clip that fits, at a start placed by u in [0, 1)."""
    fitting = [f for f in counts if clip_span(f, stride) <= num_available]
    frames = fitting[-1] if fitting else 1
    span = clip_span(frames, stride)
    start = min(int(u * (num_available - span + 1)), num_available - span)
    return frames, max(start, 0)


def clip_span(frames: int, stride: float) -> int:
    """Source frames from the first of a clip to its last, both included."""
    return clip_indices(0, frames, stride)[-1] + 1


def clip_indices(start: int, frames: int, stride: float) -> list[int]:
    """Source frame of each clip frame: the nearest to start + k x stride (halves up), as
    ffmpeg's fps filter picks them; an integer stride gives every stride-th frame."""
    return [start + math.floor(k * stride + 0.5) for k in range(frames)]


def upright_frame(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 of a decoded frame as it is meant to be seen: its YUV converted with the
    matrix its stream names, else the one a player guesses (`color.yuv_matrix`), turned and
    mirrored by its display matrix (a phone stores a portrait video sideways with one) as
    ffmpeg's autorotate does (`display_orientation`); a view."""
    rgb = frame.to_ndarray(format="rgb24", src_colorspace=yuv_matrix(frame), threads=1)  # (H, W, 3) as stored
    return upright(rgb, display_orientation(frame))


def display_orientation(frame: av.VideoFrame) -> int:
    """The EXIF orientation (1-8, as `upright` applies it) of a decoded frame's display matrix,
    by ffmpeg's autorotate rules (fftools: `get_rotation`, then transpose/hflip/vflip by the
    signs of the matrix): its rotation to the nearest quarter turn and any mirroring.
    A mirrored matrix (a front camera's recording) reads as a rotation of 180 degrees
    (`av_display_rotation_get` of a horizontal flip): turning by it alone showed the video upside down."""
    side = frame.side_data.get("DISPLAYMATRIX")
    if side is None:
        return 1
    m = np.frombuffer(side, np.int32)  # 3x3, row-major, 16.16 fixed point (libavutil/display.h)
    clockwise = round(-frame.rotation / 90) % 4  # ffmpeg's theta, in quarter turns
    if clockwise == 1:
        return 5 if m[3] > 0 else 6  # transpose=cclock_flip (a transpose), else clock
    if clockwise == 2:
        return {(True, True): 3, (True, False): 2, (False, True): 4}.get((bool(m[0] < 0), bool(m[4] < 0)), 1)
    if clockwise == 3:
        return 7 if m[3] < 0 else 8  # transpose=clock_flip (the other diagonal), else cclock
    return 4 if m[4] < 0 else 1  # a vertical flip alone


def video_pixels(data: bytes, spec: TransformSpec, u: tuple[float, float, float]) -> Pixels:
    """Decode a clip of an allowed length (PyAV), crop and resize every frame alike; frames in
    BT.2020 primaries are converted to BT.709 after the resize (color.py)."""
    try:
        clip = _clip(data, spec, u[2])
    except (av.error.FFmpegError, IndexError, ValueError, OSError) as e:
        raise SkipSample("corrupt_video", str(e) or type(e).__name__) from None
    if not clip.frames:
        raise SkipSample("corrupt_video", "no decodable frame")
    height, width = clip.frames[0].shape[:2]
    ax, ay = clip.pixel_shape
    shown_w, shown_h = width * ax, height * ay  # as shown: pixels that are not square stretched
    sizes = _out_sizes(spec, spec.bucket(round(shown_w), round(shown_h)))
    box = crop_box(shown_w, shown_h, sizes[-1][1], sizes[-1][0], spec.random_crop, u[:2])
    box = (box[0] / ax, box[1] / ay, box[2] / ax, box[3] / ay)  # in stored pixels
    per_frame = [_fit(rgb, box, sizes) for rgb in clip.frames]
    stacks = [np.stack([f[i] for f in per_frame]) for i in range(len(sizes))]  # (F, h, w, 3)
    if clip.bt2020:
        stacks = [bt2020_to_bt709(s) for s in stacks]
    return Pixels(stacks[0], stacks[1] if len(stacks) > 1 else None)


class Clip(NamedTuple):
    """A clip's upright frames (H, W, 3) as decoded, the (width, height) of one of their pixels
    as shown (`pixel_shape`) and whether their colours are in BT.2020 primaries."""

    frames: list[np.ndarray]
    pixel_shape: tuple[float, float]
    bt2020: bool


def _clip(data: bytes, spec: TransformSpec, u: float) -> Clip:
    """The clip `u` places (`_upright`): the longest allowed length that fits the frame count
    (the header's; else, as in Matroska and WebM, duration x frame rate), decoded from the
    keyframe before its start after a seek. Frames are counted from the first one instead
    where the clip starts there, where seeking fails, or where the video turns out shorter
    than its header says (then the clip is placed again within what is there). A video whose
    header gives neither count nor duration (a live WebM, as a browser's MediaRecorder writes
    it) has its packets counted (`packet_count`): placed within its own length instead, every
    clip of it was its first frames."""
    with open_video(data) as container:
        stream = container.streams.video[0]
        rate = frame_rate(stream)
        stride = spec.stride(rate)
        known = video_length(container, stream, data) or clip_span(spec.frame_counts[-1], stride)
        frames, start = choose_clip(known, spec.frame_counts, stride, u)
        wanted = clip_indices(start, frames, stride)
        if start == 0 or not rate:
            return _upright(_counted(container, stream, wanted, spec.frame_counts, stride, u, rate), stream)
        sought = _sought(container, stream, wanted, rate)
        if sought is not None:
            return _upright(sought, stream)
    with open_video(data) as container:
        stream = container.streams.video[0]
        return _upright(_counted(container, stream, wanted, spec.frame_counts, stride, u, rate), stream)


def open_video(data: bytes):
    """A video's container whose first video stream decodes on this thread alone, as its frames
    are converted (`upright_frame`): FFmpeg's default is a pool of threads per decoder and per
    scaler, which a loader worker (one process of several a core) does not need, and which a
    process forked while one of them held a lock of FFmpeg's (a worker forked again after a
    crash, by a rank that decoded a preview clip) waits on forever."""
    container = av.open(io.BytesIO(data))
    try:
        container.streams.video[0].thread_count = 1
    except BaseException:
        container.close()
        raise
    return container


def _upright(frames: list[av.VideoFrame], stream) -> Clip:
    """The frames as arrays turned upright (`upright_frame`), the shape of their pixels and
    their primaries; SkipSample for PQ (HDR10) video, which needs tone mapping (color.py)."""
    if not frames:
        return Clip([], (1.0, 1.0), False)
    first = frames[0]
    if first.color_trc == PQ_TRANSFER:
        raise SkipSample("hdr_video", "PQ (HDR10) video needs tone mapping to SDR, which the loader does not do; "
                                      "convert it first (ffmpeg's zscale and tonemap filters)")
    arrays = [upright_frame(f) for f in frames]
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:  # a stream that changes resolution: one crop box cannot fit its frames
        raise SkipSample("corrupt_video", f"the frames change size within the clip: (H, W) {shapes}")
    shape = pixel_shape(stream, first)
    if not 1 / MAX_PIXEL_ASPECT <= shape[0] / shape[1] <= MAX_PIXEL_ASPECT:
        raise SkipSample("corrupt_video", f"sample aspect ratio {stream.sample_aspect_ratio} is out of "
                                          f"[1/{MAX_PIXEL_ASPECT}, {MAX_PIXEL_ASPECT}]")
    return Clip(arrays, shape, first.color_primaries == BT2020_PRIMARIES)


MAX_PIXEL_ASPECT = 10  # anamorphic video stretches its pixels by 4:3 or 2:1; a ratio beyond this is a corrupt header


def pixel_shape(stream, frame: av.VideoFrame) -> tuple[float, float]:
    """(width, height) of one pixel of the upright frame as shown: the stream's sample aspect
    ratio by 1 (anamorphic video: 720x480 coded, 853x480 shown at 32:27), the other way round
    where the frame is turned by 90 degrees."""
    sar = float(stream.sample_aspect_ratio or 1)
    return (1.0, sar) if display_orientation(frame) >= 5 else (sar, 1.0)


def frame_rate(stream):
    """A video stream's frame rate (a Fraction): its average, else FFmpeg's guess; None where
    neither is known."""
    return stream.average_rate or stream.guessed_rate


def frame_count(container, stream) -> int:
    """Frames of a video stream: its header's count, else (Matroska, WebM) its duration x its
    frame rate, to the nearest frame; 0 when neither is known. (Matroska keeps times in
    milliseconds: 16 frames at 12 fps last 1.333 s, 15.996 frames, which truncating took for
    15 and then gave a clip of num_frames=16 a single frame.)"""
    rate = frame_rate(stream)
    if stream.frames or not rate:
        return stream.frames
    if stream.duration is not None and stream.time_base is not None:
        return round(stream.duration * stream.time_base * rate)
    return round(container.duration * rate / av.time_base) if container.duration else 0


def video_length(container, stream, data: bytes) -> int:
    """Frames of a video as its clips are placed over it: its header's count or duration
    (`frame_count`), else its packets counted (`packet_count`; a live WebM has neither); 0 when
    none is found. `dit data inspect` reports this count too: reading the header alone, it
    reported 0 frames (and 0 seconds) for a live WebM that training places clips over."""
    return frame_count(container, stream) or packet_count(data)


def packet_count(data: bytes) -> int:
    """Frames of a video's first video stream counted by reading its packets (one a frame,
    none decoded), for a stream whose header has neither count nor duration."""
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)


def _sought(container, stream, wanted: list[int], rate) -> Optional[list[av.VideoFrame]]:
    """Frames `wanted` (ascending source indices, repeats allowed) decoded after a seek to the
    keyframe at or before the first: a frame's index is its time since the first frame x the
    frame rate, as in `_counted`, the count from the first frame for a constant rate (for a
    variable one, the first frame at or after each wanted time). The first frame's time is read
    from the packets (`_first_time`), not the stream's start: an AVI stores no presentation
    times, and where its decoder delays frames (B-frames, x264) its first frame is shown at 1
    while its stream starts at 0; every clip sought in it started one frame early. The seek
    still goes to the wanted time after the stream's start, the earlier of the two. None where
    a timestamp is missing, the seek fails or lands past the first wanted frame, or the stream
    ends first."""
    base, start = stream.time_base, stream.start_time or 0
    if base is None:
        return None
    out, targets = [], iter(wanted)
    target = next(targets)
    try:
        first = _first_time(container, stream)
        if first is None:
            return None
        container.seek(start + math.floor(target / (rate * base)), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            index = round((frame.pts - first) * base * rate)
            if index < target:
                continue
            if index > target and not out:
                return None
            while target is not None and target <= index:
                out.append(frame)
                target = next(targets, None)
            if target is None:
                return out
    except av.error.FFmpegError:
        return None
    return None


def _first_time(container, stream) -> Optional[int]:
    """The presentation time of a stream's first frame, as the first decoded frame has it, read
    from its packets alone (decoding that frame made a seek in a 512 px video about a third
    slower: the decoder's delay decodes several first): the least presentation time of the
    packets read until one's decoding time passes it, as no packet is shown before it is
    decoded. Packets a demuxer marks to discard (before an MP4's edit list starts) are never
    shown. None where no packet has a time."""
    first = None
    for packet in container.demux(stream):
        if first is not None and packet.dts is not None and packet.dts > first:
            break
        if packet.pts is not None and packet.size and not packet.is_discard:
            first = packet.pts if first is None else min(first, packet.pts)
    return first


def _counted(container, stream, wanted: list[int], counts: tuple[int, ...], stride: float, u: float,
             rate=None) -> list[av.VideoFrame]:
    """Frames `wanted`, decoding from the first; a video shorter than `wanted` gets its clip
    placed again within the frames it has. A frame's index is its time since the first frame
    x the frame rate, and each wanted index takes the first frame at or after it, as in
    `_sought`: a clip of a variable-rate video spans the same time whether it starts on the
    first frame or after a seek. Frames are counted where a timestamp or the rate is missing
    (for a constant rate the two agree). Counting alone gave a variable-rate clip from the
    first frame another time span than the same clip elsewhere (at data.fps: twice as fast
    after a stretch at twice the average rate)."""
    base, first = stream.time_base, None
    timed = bool(rate) and base is not None
    decoded, indices = [], []
    for frame in container.decode(stream):
        if timed and frame.pts is None:
            timed, indices = False, list(range(len(indices)))
        if first is None:
            first = frame.pts  # the first frame is index 0 (AVI: its pts is 1, its stream's start 0)
        decoded.append(frame)
        indices.append(round((frame.pts - first) * base * rate) if timed else len(indices))
        if indices[-1] >= wanted[-1]:
            break
    if not decoded:
        return []
    if indices[-1] < wanted[-1]:
        frames, start = choose_clip(indices[-1] + 1, counts, stride, u)
        wanted = clip_indices(start, frames, stride)
    out, i = [], 0
    for target in wanted:  # ascending: the first frame at or after each
        while indices[i] < target and i + 1 < len(decoded):
            i += 1
        out.append(decoded[i])
    return out


def refit(frames: np.ndarray, num_frames: int, hw: tuple[int, int]) -> np.ndarray:
    """Force a clip (F, H, W, 3) into another bucket: keep the first frames (a still, F = 1,
    repeated into a static clip), centre-crop-resize each. A clip that fits comes back itself,
    not a copy: every still of an image batch passes here."""
    if len(frames) != num_frames:
        frames = np.repeat(frames, num_frames, axis=0) if len(frames) == 1 else frames[:num_frames]
    h, w = frames.shape[1:3]
    if (h, w) == tuple(hw):
        return frames
    box = crop_box(w, h, hw[1], hw[0], False, (0.5, 0.5))
    return np.stack([_fit(f, box, [hw])[0] for f in frames])
