"""Tar shards to samples, with random access by sample index.

A WebDataset shard is a tar whose consecutive members sharing a key form one sample
(`00000.jpg`, `00000.txt`, `00000.json` -> key `00000`, extensions jpg/txt/json), the layout
written by webdataset, img2dataset and video2dataset. `TarShard` walks the tar headers of a
local file and seeks over the data of samples it is not asked for, so a worker that owns the
second half of a shard reads only that half. Truncation and broken headers surface as
`SkipSample` for the samples that cannot be read; nothing in a member is ever executed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.errors import DataError, SkipSample

# webdataset's `base_plus_ext`: key = path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's metadata members (`__index__.json` ...) are not samples.
_META = re.compile(r"(^|/)__[^/]*__($|/|\.)")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # extension ("jpg", "seg.png", ...) -> undecoded bytes
    duplicate: str = ""  # why this sample repeats a key (or a member) of its shard; "" if it does not


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """`a/b/0001.seg.png` -> ("a/b/0001", "seg.png"); None for names that are not sample members."""
    if _META.search(name):
        return None
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"


class TarShard:
    """Forward cursor over the samples of one local tar file.

    `read(i)` returns sample i; reading a later index seeks over the data in between (only the
    512-byte headers are read), an earlier index reopens the file. The headers are parsed here
    (ustar, pax and GNU long names, checksums verified) rather than by `tarfile`, which costs
    more per member than decoding a small JPEG.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._first_index: dict[str, int] = {}  # key -> index of the first sample carrying it
        self._open()

    def _open(self) -> None:
        self.close()
        self._file = open(self.path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size
        self._offset = 0  # of the next header
        self._index = 0  # of the next sample to be parsed
        self._pending: Optional[tuple[str, str, int, int]] = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _fail(self, reason: str, what: str) -> SkipSample:
        return SkipSample(reason, f"{self.path} at byte {self._offset}: {what}")

    def _block(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise self._fail("truncated_tar", "unexpected end of data")
        return data

    def _header(self) -> Optional[tuple[str, str, int, int]]:
        """The next header as (name, type, data offset, size); None at the end of the archive."""
        if self._offset >= self._size:
            if self._offset > self._size:
                raise self._fail("truncated_tar", "unexpected end of data")
            return None  # no end-of-archive blocks: tolerated, as tarfile does
        hdr = self._block(self._offset, BLOCK)
        if hdr == _ZERO_BLOCK:
            return None
        try:
            checksum = _number(hdr[148:156])
            size = _number(hdr[124:136])
        except ValueError:
            raise self._fail("corrupt_tar", "unreadable header fields") from None
        if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]) and checksum != _signed_sum(hdr):
            raise self._fail("corrupt_tar", "header checksum mismatch")
        name = _text(hdr[0:100])
        if hdr[257:265] == _POSIX_MAGIC and hdr[345] != 0:
            name = _text(hdr[345:500]) + "/" + name
        kind = chr(hdr[156]) if hdr[156] else "0"
        data_offset = self._offset + BLOCK
        self._offset = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
        return name, kind, data_offset, size

    def _next_member(self) -> Optional[tuple[str, str, int, int]]:
        """The next (key, ext, data offset, size) of a sample member; None at the end."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        override: dict[str, str] = {}
        while (h := self._header()) is not None:
            name, kind, offset, size = h
            if kind in "xL":  # pax extended header / GNU long name: apply to the next member
                data = self._block(offset, size)
                try:
                    override.update(_pax(data) if kind == "x" else {"path": _text(data)})
                    big = int(override.get("size", -1))
                except ValueError:
                    raise self._fail("corrupt_tar", "malformed pax header") from None
                continue
            name = override.get("path", name)
            if "size" in override:  # sizes beyond the 8 GiB of the ustar field
                size = big
                self._offset = offset + (size + BLOCK - 1) // BLOCK * BLOCK
            override = {}
            if kind not in "07":  # directories, links, global pax headers, ...: not sample members
                continue
            parts = split_member_name(name)
            if parts is not None:
                return parts[0], parts[1], offset, size
        return None

    def _take(self, load: bool) -> Optional[RawSample]:
        """Consume the next sample; its member bytes only when `load`."""
        first = self._next_member()
        if first is None:
            return None
        key = first[0]
        index = self._index
        first_index = self._first_index.setdefault(key, index)
        members: dict[str, bytes] = {}
        names: list[str] = []
        item: Optional[tuple[str, str, int, int]] = first
        while item is not None and item[0] == key:
            names.append(item[1])
            if load:
                members[item[1]] = self._block(item[2], item[3])
            item = self._next_member()
        self._pending = item
        self._index += 1
        duplicate = ""
        if first_index != index:
            duplicate = f"key {key!r} of sample #{index} already named sample #{first_index} of {self.path}"
        elif len(set(names)) != len(names):
            duplicate = f"sample {key!r} of {self.path} holds a member twice ({sorted(names)})"
        return RawSample(key, members, duplicate)

    def read(self, index: int) -> RawSample:
        """Sample number `index` (0-based) of this shard."""
        if index < self._index:
            self._open()
        while self._index < index:
            if self._take(load=False) is None:
                break
        sample = self._take(load=True) if self._index == index else None
        if sample is None:
            raise SkipSample("truncated_tar", f"{self.path} ends before sample #{index}")
        if sample.duplicate:
            raise SkipSample("duplicate_key", sample.duplicate)
        return sample

    def __iter__(self) -> Iterator[RawSample]:
        """All samples from the start, in order, duplicates flagged (raises SkipSample at an
        unreadable part)."""
        self._open()
        while (sample := self._take(load=True)) is not None:
            yield sample


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when the high bit is set (GNU)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") + ((field[0] & 0x7F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _signed_sum(hdr: bytes) -> int:
    """The checksum some old tar writers compute over signed bytes."""
    return sum(b - 256 if b > 127 else b for b in hdr[:148] + b" " * 8 + hdr[156:])


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records `LEN key=value\n` of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def count_samples(path: str) -> int:
    """Number of samples in a tar, reading headers only (stops quietly at truncation)."""
    shard = TarShard(path)
    n = 0
    try:
        while shard._take(load=False) is not None:
            n += 1
    except SkipSample:
        pass
    finally:
        shard.close()
    return n


class ShardReader:
    """Reads samples by (shard id, index) across shards, keeping the last few shards open."""

    def __init__(self, paths: list[str], max_open: int = 4):
        self.paths = paths
        self.max_open = max_open
        self._open: dict[int, TarShard] = {}

    def read(self, shard_id: int, index: int) -> RawSample:
        shard = self._open.pop(shard_id, None)
        if shard is None:
            path = self.paths[shard_id]
            if not Path(path).is_file():
                raise DataError(f"shard {path} listed in the manifest does not exist; restore it or "
                                f"rewrite the manifest with `dit data inspect DIR --write-manifest`")
            shard = TarShard(path)
        self._open[shard_id] = shard  # most recently used last
        while len(self._open) > self.max_open:
            oldest = next(iter(self._open))
            self._open.pop(oldest).close()
        return shard.read(index)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()
