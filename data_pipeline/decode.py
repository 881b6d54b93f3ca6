"""Safe decoding: an allowlist of member types, nothing else is ever interpreted.

webdataset's default decoders unpickle `.pyd`/`.pkl` members, which executes code chosen by
whoever wrote the shard. Here every member type has an explicit decoder (libjpeg-turbo through
simplejpeg for JPEGs, PIL for other images and the JPEGs libjpeg-turbo flags, PyAV for video,
UTF-8 text, JSON, `.npy` with `allow_pickle=False`, safetensors); pickle-like members are
dropped and counted, never opened; unknown members are dropped and counted.

An image's EXIF orientation (how a camera held sideways says its pixels are to be turned) and
its ICC colour profile are read with its header, so that training sees photos upright and in
sRGB, as a viewer shows them (see transforms.py and color.py).
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Union

import numpy as np
import PIL.Image
import safetensors.torch
import simplejpeg
import torch

from data_pipeline.errors import SkipCounter, SkipSample
from data_pipeline.tar_reader import RawSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "avif")  # in order of preference for the sample's image
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
CAPTION_EXTS = ("txt", "caption", "text")
TENSOR_EXTS = ("npy", "safetensors")
# Pickle-based formats: executing them is how a malicious shard would run code.
UNSAFE_EXTS = ("pyd", "pkl", "pickle", "pth", "pt", "ckpt", "joblib", "dill")
# PIL would otherwise also open EPS (Ghostscript) and dozens of other parsers.
PIL_FORMATS = ["JPEG", "PNG", "WEBP", "AVIF"]
# JPEG colour spaces libjpeg-turbo turns into RGB itself (CMYK and YCCK go to PIL's conversion).
_TURBO_SPACES = frozenset(("YCbCr", "Gray", "RGB"))
_JPEG_SOI = b"\xff\xd8"
_EXIF_ORIENTATION = 0x0112  # TIFF tag: 1 = as stored; 2-8 = flipped and/or turned (see transforms.upright)
_EXIF_HEADER = b"Exif\0\0"
_ICC_HEADER = b"ICC_PROFILE\0"
_DECODED = frozenset((*IMAGE_EXTS, *VIDEO_EXTS, *CAPTION_EXTS, "json"))  # one lookup a member
_ARRAYS = frozenset(TENSOR_EXTS)
_UNSAFE = frozenset(UNSAFE_EXTS)


def _load_image_plugins() -> None:
    """Import PIL's decoders of PIL_FORMATS now, in the process that imports this module: PIL
    imports its plugins at the first `open`, which was in each loader worker after the fork,
    again every epoch (with numpy.random, see plan.py: ~0.1 s of CPU a worker)."""
    PIL.Image.preinit()  # JPEG, PNG (and BMP, GIF, PPM, which `open` is not allowed to use)
    from PIL import AvifImagePlugin, WebPImagePlugin  # noqa: F401 - register them: `open` never imports every plugin


_load_image_plugins()


def _draft_scale(most: int) -> int:
    """The largest DCT scale divisor (8, 4, 2, 1) not above `most`."""
    return 8 if most >= 8 else 4 if most >= 4 else 2 if most >= 2 else 1


@dataclass(frozen=True, slots=True)
class Jpeg:
    """A JPEG whose header libjpeg-turbo read (size and colour space): its pixels are decoded
    by `decode`, at a reduced DCT scale when the output is smaller. simplejpeg decodes in one C
    call what PIL decodes line by line after parsing the markers in Python: 63 against 174 us
    for a 256 px JPEG at half scale on the loader bench's machine, the same pixels."""

    data: bytes
    size: tuple[int, int]  # (width, height) as stored, as PIL's `Image.size`
    orientation: int = 1  # EXIF orientation, 1-8
    icc: bytes = b""  # the embedded ICC colour profile, if any

    def decoded_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(H, W, 3) of `decode(width, height)`: the stored size at the scale PIL's `draft`
        picks for a width x height output (the largest of 1/8, 1/4, 1/2 leaving at least that,
        else full size)."""
        w, h = self.size
        s = _draft_scale(max(1, min(w // width, h // height)))
        return -(-h // s), -(-w // s), 3

    def decode(self, width: int, height: int, into: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """(H, W, 3) uint8 at `decoded_shape`: the same pixels PIL gives; written into `into`
        (a C-contiguous array of that shape) when given. None when libjpeg-turbo warns about the
        data (corrupt or truncated, or only stray bytes): PIL's decoder then decides, as for any
        image, which keeps a JPEG with harmless warnings and skips a truncated one."""
        h, w, _ = shape = self.decoded_shape(width, height)
        if into is not None and (into.shape != shape or not into.flags.c_contiguous):
            raise ValueError(f"decoding into an array of shape {into.shape}: it must be C-contiguous of shape {shape}")
        try:
            return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_height=h, min_width=w, strict=True,
                                          buffer=into)
        except ValueError:
            return None

    def pil(self) -> PIL.Image.Image:
        return _pil_image(self.data)


@dataclass(slots=True)
class Decoded:
    """A sample after decoding; media stay lazy (image header parsed, video bytes). (Slots: one
    is made per sample.)"""

    key: str
    caption: str
    meta: dict
    image: Optional[Union[Jpeg, PIL.Image.Image]] = None
    video: Optional[bytes] = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta_json: bytes = b"{}"  # the json member as read (what a batch carries, see JsonRecords)


@lru_cache(maxsize=1024)
def member_type(ext: str) -> str:
    """The last dotted part of an extension, lower-case: `seg.PNG` -> `png` (cached: a dataset
    holds a handful of extensions, met three times a sample)."""
    return ext.rsplit(".", 1)[-1].lower()


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SkipSample("corrupt_text", str(e)) from None


def decode_json(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SkipSample("corrupt_json", str(e)) from None
    return value if isinstance(value, dict) else {"value": value}


class JsonRecords(Sequence):
    """The json members of a batch as dicts, parsed when read.

    A batch carries its metadata as the bytes of each sample's (already validated) json
    member: unpickling 32 small dicts in the main process cost ~260 us a batch, more than the
    rest of the hand-over, and training never reads them."""

    def __init__(self, members: list[bytes]):
        self.members = members

    def __len__(self) -> int:
        return len(self.members)

    def __reduce__(self):
        """Pickled as a call with the list (the batch crosses a pipe): no per-attribute state."""
        return JsonRecords, (self.members,)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [decode_json(m) for m in self.members[index]]
        return decode_json(self.members[index])

    def __repr__(self) -> str:
        return f"JsonRecords({list(self)!r})"


def decode_npy(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays need pickle: refused here
        raise SkipSample("corrupt_array", f"npy: {e}") from None
    if not isinstance(array, np.ndarray):
        raise SkipSample("corrupt_array", "npy member is not a single array")
    if not array.dtype.isnative:  # big-endian: torch holds native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as e:  # strings, datetimes, records: no tensor dtype holds them
        raise SkipSample("corrupt_array", f"npy of dtype {array.dtype}: {e}") from None


def decode_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # the Rust parser raises its own error type on any malformed header
        raise SkipSample("corrupt_array", f"safetensors: {e}") from None


def open_image(data: bytes) -> Union[Jpeg, PIL.Image.Image]:
    """Parse the header of a JPEG/PNG/WebP (pixels are decoded later, at the needed scale): a
    `Jpeg` where libjpeg-turbo reads the header and converts the colour space, else PIL's
    image (other formats, CMYK, a header libjpeg-turbo refuses or warns about)."""
    if data[:2] == _JPEG_SOI:
        try:
            height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            space = ""
        if space in _TURBO_SPACES:
            _check_pixels(width, height)
            return Jpeg(data, (width, height), *jpeg_metadata(data))
    return _pil_image(data)


def jpeg_metadata(data: bytes) -> tuple[int, bytes]:
    """(EXIF orientation, ICC profile) of a JPEG (1 and b"" when it has none), from the
    application segments that open the file: the APP1 "Exif" segment, where EXIF 2.3 (CIPA
    DC-008, tag 274) puts it, and the APP2 "ICC_PROFILE" chunks (ICC.1, annex B.4), joined in
    their order. ~0.5 us, where PIL's full EXIF parse alone takes ~20 (PIL also finds an APP1
    placed after the tables, which no conforming writer does)."""
    pos, turn, icc = 2, 0, {}
    while pos + 4 <= len(data) and data[pos] == 0xFF and (0xE0 <= data[pos + 1] <= 0xEF or data[pos + 1] == 0xFE):
        end = pos + 2 + int.from_bytes(data[pos + 2: pos + 4], "big")
        if data[pos + 1] == 0xE1 and not turn and data[pos + 4: pos + 10] == _EXIF_HEADER:
            turn = _tiff_orientation(data[pos + 10: end])
        elif data[pos + 1] == 0xE2 and data[pos + 4: pos + 16] == _ICC_HEADER:
            icc[data[pos + 16: pos + 17]] = data[pos + 18: end]  # by sequence number (1-based)
        pos = end
    return turn or 1, b"".join(icc[n] for n in sorted(icc)) if icc else b""


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation entry of the first image directory of an EXIF block (a TIFF header and
    directory: "II"/"MM" byte order, then 12-byte entries tag, type, count, value); 1 when
    absent or malformed."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (entries,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(min(entries, (len(tiff) - ifd - 2) // 12)):
        tag, kind, count, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * i)
        if tag == _EXIF_ORIENTATION:
            return value if kind == 3 and count == 1 and 1 <= value <= 8 else 1  # one SHORT
    return 1


def orientation(img: Union[Jpeg, PIL.Image.Image]) -> int:
    """EXIF orientation 1-8 of an opened image (1 when it has none or it is unreadable)."""
    if isinstance(img, Jpeg):
        return img.orientation
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        return 1  # the pixels decide whether the sample is usable
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def icc_profile(img: Union[Jpeg, PIL.Image.Image]) -> bytes:
    """The ICC colour profile embedded in an opened image (b"" when none)."""
    return img.icc if isinstance(img, Jpeg) else img.info.get("icc_profile") or b""


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as seen upright: swapped for the orientations that turn by 90 degrees
    (5-8); the same swap maps an upright size back to the stored one."""
    return (size[1], size[0]) if orientation >= 5 else size


def _check_pixels(width: int, height: int) -> None:
    """PIL's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`, None: no limit)."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise SkipSample("corrupt_image", f"{width}x{height} pixels exceeds twice PIL's MAX_IMAGE_PIXELS "
                                          f"({limit}): a decompression bomb")


def _pil_image(data: bytes) -> PIL.Image.Image:
    try:
        return PIL.Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except (PIL.UnidentifiedImageError, OSError, ValueError, PIL.Image.DecompressionBombError,
            RuntimeError) as e:  # RuntimeError: libavif's (AVIF) on corrupt data
        raise SkipSample("corrupt_image", str(e)) from None


def decode_sample(raw: RawSample, shard: str, counter: SkipCounter) -> Decoded:
    """Decode the members of one sample through the allowlist; SkipSample when unusable."""
    first: dict[str, bytes] = {}  # member type -> the bytes of its first member
    arrays: list[tuple[str, str, bytes]] = []  # (type, extension, bytes) of the tensor members
    for ext, data in raw.members.items():
        t = member_type(ext)
        if t in _ARRAYS:
            arrays.append((t, ext, data))
        elif t in _DECODED:
            first.setdefault(t, data)
        elif t in _UNSAFE:
            counter.member("rejected_unsafe_member", shard, raw.key, f"{raw.key}.{ext}")
        else:
            counter.member("ignored_member", shard, raw.key, f"{raw.key}.{ext}")
    meta_json = first.get("json", b"{}")
    meta = decode_json(meta_json)
    image, video = _first(first, IMAGE_EXTS), _first(first, VIDEO_EXTS)
    if image is not None or video is not None:  # a pixel sample: its tensors are no input (boxes, tags...)
        for _, ext, _ in arrays:
            counter.member("ignored_member", shard, raw.key, f"{raw.key}.{ext}")
        arrays = []
    sample = Decoded(raw.key, sample_caption(first, meta), meta, meta_json=meta_json, tensors=_tensors(arrays))
    if image is not None:
        sample.image = open_image(image)
    elif video is not None:
        sample.video = video
    elif not sample.tensors:
        raise SkipSample("missing_media", f"no image, video or tensor member among {sorted(raw.members)}")
    return sample


def _first(first: dict[str, bytes], types: tuple[str, ...]) -> Optional[bytes]:
    """The first member of the first of `types` (in order of preference) the sample has."""
    for t in types:
        if t in first:
            return first[t]
    return None


def sample_caption(first: dict[str, bytes], meta: dict) -> str:
    """A sample's caption by the loader's rule: its first caption member (member type -> bytes
    in `first`), else its json's `caption`; SkipSample when it has none or it is empty."""
    data = _first(first, CAPTION_EXTS)
    if data is not None:
        caption = decode_text(data)
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    else:
        raise SkipSample("missing_caption", "no txt member and no caption in json")
    if not caption:
        raise SkipSample("empty_caption", "the caption is empty")
    return caption


def _tensors(arrays: list[tuple[str, str, bytes]]) -> dict[str, torch.Tensor]:
    """The tensors of the .npy members (named by extension), then of the .safetensors ones."""
    out: dict[str, torch.Tensor] = {}
    for t, ext, data in arrays:
        if t == "npy":
            out[ext[: -len(".npy")] if ext.lower().endswith(".npy") else "npy"] = decode_npy(data)
    for t, _, data in arrays:
        if t == "safetensors":
            for name, value in decode_safetensors(data).items():
                if name in out:
                    raise SkipSample("corrupt_array", f"tensor {name!r} appears in two members")
                out[name] = value
    return out

