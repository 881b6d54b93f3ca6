"""Tar shards to samples, with random access by sample index.

A WebDataset shard is a tar whose consecutive members sharing a key form one sample
(`00000.jpg`, `00000.txt`, `00000.json` -> key `00000`, extensions jpg/txt/json), the layout
written by webdataset, img2dataset and video2dataset. `TarShard` walks the tar headers of a
local file and seeks over the data of samples it is not asked for, so a worker that owns the
second half of a shard reads only that half. Truncation and broken headers surface as
`SkipSample` for the samples that cannot be read; nothing in a member is ever executed.

A local shard is read through a read-only memory map (`MappedFile`): a header or a member is
a slice of the page cache, not a seek and a read system call each. A local sample can also be
located without its bytes (`LazySample`: the headers are walked now, the members are copied
out when `load` is called, just before decoding), so a worker holds the bytes of the sample it
decodes, not those of a whole shuffle block.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

from data_pipeline import progress, remote
from data_pipeline.errors import DataError, SkipSample
from data_pipeline.remote import RemoteOptions
from data_pipeline.shard_cache import Recorded, open_shard

log = logging.getLogger("data_pipeline")

# webdataset's `base_plus_ext`: key = path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's metadata members (`__index__.json` ...) are not samples.
_META = re.compile(r"(^|/)__[^/]*__($|/|\.)")


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]  # extension ("jpg", "seg.png", ...) -> undecoded bytes
    duplicate: str = ""  # why this sample repeats a key (or a member) of its shard; "" if it does not


class MappedFile:
    """A local file as a read-only memory map (`map`: bytes-like, sliced for reads). The map
    lives as long as this object or a `LazySample` holding it, and holds a descriptor of its
    own (Python's mmap keeps a duplicate): a worker has one per shard of the shuffle block it
    is reading. (A file truncated by someone else while mapped makes its later pages
    unreadable: SIGBUS ends the worker, which the worker pool reports.)"""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`: fewer only at the end of the file, as a read."""
        return self.map[offset: offset + size]

    def close(self) -> None:
        """Drop this reference to the map: unmapped once no LazySample holds it either."""
        self.map = b""


Span = tuple[str, int, int]  # a member: (extension, data offset, size)


class LazySample(NamedTuple):
    """A local sample whose headers were read and checked, its member bytes not yet."""

    key: str
    spans: tuple[Span, ...]
    source: object  # MappedFile.map: still readable after the shard is closed
    path: str

    def load(self) -> "RawSample":
        """The sample with its member bytes; SkipSample("truncated_tar") when one is cut short."""
        members = {}
        for ext, offset, size in self.spans:
            data = self.source[offset: offset + size]
            if len(data) != size:
                raise SkipSample("truncated_tar", f"{self.path} at byte {offset}: unexpected end of data")
            members[ext] = data
        return RawSample(self.key, members)


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
    """Forward cursor over the samples of one tar file: a local path, a URL fsspec opens
    (s3://, gs://, https://, ...) or a `pipe:` command (see remote.py).

    `read(i)` returns sample i; reading a later index seeks over the data in between (only the
    512-byte headers are read; remotely each seek past the read-ahead buffer is one ranged
    read), an earlier index reopens the file. With `offsets` (the byte index of a manifest:
    where each sample's first header starts) a shard other than a pipe jumps straight to the
    sample asked for: a worker parses the headers of its own samples only, not those of the
    samples between them that other workers read. The headers are parsed here (ustar, pax and GNU long names, checksums verified)
    rather than by `tarfile`, which costs more per member than decoding a small JPEG.

    Transient read errors are retried `options.retries` times with exponential backoff, each
    time on a freshly opened file; after the last, `read` raises SkipSample("unreadable_shard").
    """

    def __init__(self, path: str, offsets: Optional[list[int]] = None,
                 options: Optional[RemoteOptions] = None, recorded: Recorded = Recorded()):
        self.path = path
        self.recorded = recorded  # the manifest's size and sha256, checked on remote opens
        self.options = options or RemoteOptions()
        self._pipe, self._remote = remote.is_pipe(path), remote.is_remote(path)  # asked at every read
        self.offsets = [] if self._pipe else list(offsets or [])
        self._file = None
        self._size: Optional[int] = None
        self._first_index: dict[str, int] = {}  # key -> index of the first sample carrying it
        self._transient = remote.transient_errors() if self._remote else (OSError,)
        self._rewind()

    def _rewind(self) -> None:
        """Back to the first sample; a pipe restarts, a file is reopened on the next read."""
        if self._pipe or not self._remote or isinstance(self._file, remote.ForwardOnly):
            self.close()
        self._offset = 0  # of the next header
        self._index = 0  # of the next sample to be parsed
        self._pending: Optional[tuple[str, str, int, int]] = None

    def _jump(self, index: int) -> None:
        """Continue at sample `index`, at its offset from the byte index."""
        self._offset, self._index, self._pending = self.offsets[index], index, None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection cannot be closed cleanly; it is dropped
                pass
            self._file = None

    def _fail(self, reason: str, what: str) -> SkipSample:
        return SkipSample(reason, f"{remote.redact(self.path)} at byte {self._offset}: {what}")

    def _ensure_open(self) -> None:
        if self._file is None:
            if self._remote:
                self._file = open_shard(self.path, self.options, self.recorded)
                self._size = remote.file_size(self._file)
            else:
                self._file = MappedFile(self.path)
                self._size = self._file.size

    def _read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at the end of the file), with retries."""
        attempt = 0
        while True:
            try:
                if isinstance(self._file, remote.ForwardOnly) and offset < self._file.pos:
                    self.close()  # a pipe or stream cannot go back: start the command or download again
                self._ensure_open()
                if isinstance(self._file, MappedFile):
                    return self._file.read_at(offset, size)
                self._file.seek(offset)
                return self._read_counted(size)
            except remote.PERMANENT:
                raise
            except self._transient as e:
                self.close()
                if attempt >= self.options.retries:
                    failed = self._fail("unreadable_shard", f"{attempt + 1} attempts failed, the last with "
                                        f"{type(e).__name__}: {remote.redact(str(e))}")
                    if not self.options.skip_unreadable:
                        raise DataError(f"{failed.detail} (not skipped: other ranks read the same samples "
                                        f"and would not skip them; restart the job to read it again)") from None
                    raise failed from None
                progress.step()  # an attempt that failed is no stall: the stall watch sees it
                delay = self.options.backoff * 2 ** attempt
                log.warning("reading %s failed (%s: %s); retry %d of %d in %.1f s", remote.redact(self.path),
                            type(e).__name__, remote.redact(str(e)), attempt + 1, self.options.retries, delay)
                time.sleep(delay)
                attempt += 1

    def _read_counted(self, size: int) -> bytes:
        """Up to `size` bytes of a remote file or pipe from where it stands, read a block
        (remote_block_size) at a time, each a step of progress (progress.py): a large member
        arriving slowly is not taken for a stall."""
        block = max(self.options.block_size, BLOCK)
        parts = []
        while size > 0:
            part = self._file.read(min(size, block))
            progress.step()
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _block(self, offset: int, size: int) -> bytes:
        data = self._read(offset, size)
        if len(data) != size:
            raise self._fail("truncated_tar", "unexpected end of data")
        return data

    def _header(self) -> Optional[tuple[str, str, int, int]]:
        """The next header as (name, type, data offset, size); None at the end of the archive."""
        if self._size is None:
            self._ensure_open_retrying()
        if self._size is not None and self._offset >= self._size:
            if self._offset > self._size:
                raise self._fail("truncated_tar", "unexpected end of data")
            return None  # no end-of-archive blocks: tolerated, as tarfile does
        hdr = self._read(self._offset, BLOCK)
        if not hdr and self._size is None:
            return None  # the end of a pipe, without end-of-archive blocks
        if len(hdr) != BLOCK:
            raise self._fail("truncated_tar", "unexpected end of data")
        if hdr == _ZERO_BLOCK:
            return None
        try:
            checksum = _number(hdr[148:156])
            size = _number(hdr[124:136])
        except ValueError:
            raise self._fail("corrupt_tar", "unreadable header fields") from None
        if checksum != _unsigned_sum(hdr) and checksum != _signed_sum(hdr):
            raise self._fail("corrupt_tar", "header checksum mismatch")
        name = _text(hdr[0:100])
        if hdr[257:265] == _POSIX_MAGIC and hdr[345] != 0:
            name = _text(hdr[345:500]) + "/" + name
        kind = chr(hdr[156]) if hdr[156] else "0"
        data_offset = self._offset + BLOCK
        self._offset = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
        return name, kind, data_offset, size

    def _next_member(self) -> Optional[tuple[str, str, int, int, int]]:
        """The next (key, ext, data offset, size, header offset) of a sample member; None at the end."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        override: dict[str, str] = {}
        start = self._offset
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
                start = self._offset
                continue
            parts = split_member_name(name)
            if parts is not None:
                return parts[0], parts[1], offset, size, start
            start = self._offset
        return None

    def _take(self, load: bool) -> Optional[tuple[str, list[Span], dict[str, bytes], str]]:
        """Consume the next sample: (key, its member spans, its member bytes when `load` (read
        before the next header: a pipe goes forward only), why it repeats a key or a member of
        this shard or ""); None at the end."""
        first = self._next_member()
        if first is None:
            return None
        key = first[0]
        index = self._index
        self.last_start = first[4]  # where this sample's first header starts (the byte index)
        first_index = self._first_index.setdefault(key, index)
        spans: list[Span] = []
        members: dict[str, bytes] = {}
        end = self.offsets[index + 1] if index + 1 < len(self.offsets) else -1  # the next sample's header
        item: Optional[tuple[str, str, int, int, int]] = first
        while item is not None and item[0] == key:
            spans.append(item[1:4])
            if load:
                members[item[1]] = self._block(item[2], item[3])
            item = None if self._offset == end else self._next_member()  # with the index: no look-ahead
        self._pending = item
        self._index += 1
        duplicate = ""
        names = [ext for ext, _, _ in spans]
        if first_index != index:
            duplicate = f"key {key!r} of sample #{index} already named sample #{first_index} of {self.path}"
        elif len(set(names)) != len(names):
            duplicate = f"sample {key!r} of {self.path} holds a member twice ({sorted(names)})"
        return key, spans, members, duplicate

    def _ensure_open_retrying(self) -> None:
        """Open the file (the size of a URL comes with it) under the retry policy."""
        if self._file is None:
            self._read(self._offset, 0)

    def read(self, index: int, lazy: bool = False) -> Union[RawSample, LazySample]:
        """Sample number `index` (0-based) of this shard; with `lazy`, a local sample's member
        bytes are left for `LazySample.load` (a remote one is read now, in file order)."""
        if index < len(self.offsets) and index != self._index:
            self._jump(index)
        elif index < self._index:
            self._rewind()
        while self._index < index:
            if self._take(load=False) is None:
                break
        lazy = lazy and not self._remote  # a local file: mapped (see _ensure_open)
        found = self._take(load=not lazy) if self._index == index else None
        if found is None:
            raise SkipSample("truncated_tar", f"{self.path} ends before sample #{index}")
        key, spans, members, duplicate = found
        if duplicate:
            raise SkipSample("duplicate_key", duplicate)
        return LazySample(key, tuple(spans), self._file.map, self.path) if lazy else RawSample(key, members)

    def warm(self, index: int) -> None:
        """Open the file and fetch the block holding sample `index`'s first header (the start
        of a read-ahead), with the retries of any read."""
        if index < len(self.offsets):
            self._jump(index)
        self._read(self._offset, BLOCK)

    def __iter__(self) -> Iterator[RawSample]:
        """All samples from the start, in order, duplicates flagged (raises SkipSample at an
        unreadable part)."""
        self._rewind()
        while (found := self._take(load=True)) is not None:
            key, _, members, duplicate = found
            yield RawSample(key, members, duplicate)


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when the high bit is set (GNU)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") + ((field[0] & 0x7F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _unsigned_sum(hdr: bytes) -> int:
    """The ustar checksum: the byte sum of the header with its checksum field (148:156) read
    as eight spaces (256). By zlib's Adler-32, whose low half is 1 + the byte sum modulo 65521,
    over three pieces short enough that the sum stays below it (244 x 255 = 62220): 0.5 us
    where Python's `sum` over the bytes takes 2.6, three times a sample."""
    return ((zlib.adler32(hdr[:148]) & 0xFFFF) + (zlib.adler32(hdr[156:400]) & 0xFFFF)
            + (zlib.adler32(hdr[400:]) & 0xFFFF) - 3 + 256)


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
        length = int(data[pos:space])  # of the whole record, its own digits included
        if not space - pos < length <= len(data) - pos:  # 0 never moved on: a worker looped forever
            raise ValueError(f"pax record length {length} at {pos}")
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def count_samples(path: str, options: Optional[RemoteOptions] = None) -> int:
    """Number of samples in a tar, reading headers only (stops quietly at truncation)."""
    return len(sample_offsets(path, options))


def sample_offsets(path: str, options: Optional[RemoteOptions] = None) -> list[int]:
    """Byte offset of each sample's first header (its length is the number of samples),
    reading headers only and stopping quietly at truncation."""
    return _walk_offsets(path, options)[0]


def byte_index(path: str, options: Optional[RemoteOptions] = None) -> tuple[int, list[int]]:
    """(samples, byte index) of a tar, reading headers only: the index is `sample_offsets`, or
    [] when a sample repeats a key or a member of the shard. A reader that jumps to a sample
    does not see the keys before it, so only walking finds such a duplicate."""
    offsets, unique = _walk_offsets(path, options)
    return len(offsets), offsets if unique else []


def _walk_offsets(path: str, options: Optional[RemoteOptions]) -> tuple[list[int], bool]:
    """(each sample's first header offset, whether no sample repeats a key or a member)."""
    shard = TarShard(path, options=options)
    offsets, unique = [], True
    try:
        while (found := shard._take(load=False)) is not None:
            offsets.append(shard.last_start)
            unique = unique and not found[3]
    except SkipSample:
        pass
    finally:
        shard.close()
    return offsets, unique


class ShardReader:
    """Reads samples by (shard id, index) across shards, keeping the last few shards open.

    `prefetch(shard, index)` announces the next shard to be read: a remote one is opened in a
    background thread (one shard ahead at most, holding at most one read-ahead block, or being
    copied into the shard cache) and handed to the first `read` of it.

    A shard that stays unreadable after the retries is given up for the life of the reader:
    every later sample of it is skipped at once as `unreadable_shard` (each counts against
    data.error_budget, like a corrupt sample)."""

    def __init__(self, paths: list[str], max_open: int = 4, offsets: Optional[list[list[int]]] = None,
                 options: Optional[RemoteOptions] = None, recorded: Optional[list[Recorded]] = None):
        self.paths = paths
        self.max_open = max_open
        self.offsets = offsets or [[] for _ in paths]
        self.recorded = recorded or [Recorded() for _ in paths]  # what the manifests record of each shard
        self.options = options or RemoteOptions()
        self._open: dict[int, TarShard] = {}
        self._dead: dict[int, SkipSample] = {}
        self._ahead: Optional[tuple[int, Future]] = None  # (shard id, (its TarShard, error) being warmed)
        self._threads: Optional[ThreadPoolExecutor] = None  # made on first use: in the worker, after the fork
        self.reads_ahead = self.options.readahead and any(remote.is_url(p) for p in paths)  # else prefetch is a no-op

    def prefetch(self, shard_id: int, index: int) -> None:
        """Start opening shard `shard_id` at sample `index` if it is remote and not open yet."""
        if (not self.options.readahead or self._ahead is not None or shard_id in self._open
                or shard_id in self._dead or not remote.is_url(self.paths[shard_id])):
            return
        if self._threads is None:
            self._threads = ThreadPoolExecutor(1, thread_name_prefix="shard-readahead")
        self._ahead = shard_id, self._threads.submit(self._warm, shard_id, index)

    def _warm(self, shard_id: int, index: int) -> tuple[TarShard, Optional[Exception]]:
        """In the read-ahead thread: the opened shard, or the error its reads ended with (the
        first `read` raises it: the retries are not made twice)."""
        shard = TarShard(self.paths[shard_id], self.offsets[shard_id], self.options, self.recorded[shard_id])
        try:
            shard.warm(index)
        except (SkipSample, *remote.PERMANENT) as e:
            shard.close()
            return shard, e
        return shard, None

    def _take_ahead(self, shard_id: int) -> tuple[Optional[TarShard], Optional[Exception]]:
        """The read-ahead shard when it is `shard_id` (waiting for it); a stale one is closed."""
        if self._ahead is None or (self._ahead[0] != shard_id and not self._ahead[1].done()):
            return None, None
        (ahead_id, future), self._ahead = self._ahead, None
        with progress.waiting():  # the read-ahead's download is this worker's progress now
            shard, error = future.result()
        if ahead_id == shard_id:
            return shard, error
        shard.close()
        return None, None

    def read(self, shard_id: int, index: int, lazy: bool = False) -> Union[RawSample, LazySample]:
        """Sample `index` of shard `shard_id` (see `TarShard.read` for `lazy`)."""
        if self._open and next(reversed(self._open)) == shard_id:  # the shard read last: most reads
            return self._read_open(shard_id, index, None, lazy)
        if shard_id in self._dead:
            dead = self._dead[shard_id]
            raise SkipSample(dead.reason, dead.detail)
        shard, error = self._open.pop(shard_id, None), None
        if shard is None:
            shard, error = self._take_ahead(shard_id)
        path = self.paths[shard_id]
        if shard is None:
            if not remote.is_remote(path) and not Path(path).is_file():
                raise _missing(path)
            shard = TarShard(path, self.offsets[shard_id], self.options, self.recorded[shard_id])
        self._open[shard_id] = shard  # most recently used last
        while len(self._open) > self.max_open:
            oldest = next(iter(self._open))
            self._open.pop(oldest).close()
        return self._read_open(shard_id, index, error, lazy)

    def _read_open(self, shard_id: int, index: int, error: Optional[Exception], lazy: bool):
        """Sample `index` of the open shard `shard_id`, or `error` (its read-ahead failed)."""
        try:
            if error is not None:
                raise error
            return self._open[shard_id].read(index, lazy)
        except FileNotFoundError:
            raise _missing(self.paths[shard_id]) from None
        except SkipSample as e:
            if e.reason == "unreadable_shard":
                self._dead[shard_id] = e
                self._open.pop(shard_id).close()
            raise

    def close(self) -> None:
        if self._ahead is not None:
            with progress.waiting():
                self._open[self._ahead[0]] = self._ahead[1].result()[0]
            self._ahead = None
        for shard in self._open.values():
            shard.close()
        self._open.clear()
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None


def _missing(path: str) -> DataError:
    return DataError(f"shard {remote.redact(path)} listed in the manifest does not exist; restore it or "
                     f"rewrite the manifest with `dit data inspect DIR --write-manifest`")
