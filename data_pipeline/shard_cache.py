"""A local cache of remote shards with a size limit (`data.cache_dir`, `data.cache_max_gb`).

A remote shard (s3://, gs://, https://) is downloaded whole into the cache directory the first
time a worker opens it; later opens (next epochs, other workers and ranks of the machine) read
the local copy. fsspec's `simplecache`/`filecache` do the downloading part, but they write
straight to the final file name (a killed run leaves a half shard that later reads as
truncated) and have no size limit, so this is a small wrapper instead:

- atomic: a download goes to a temporary name in the same directory and is renamed when
  complete: of the remote's size, or where the server gives none (no Content-Length) and no
  manifest records it, ending as a tar archive does (`ends_as_tar`); concurrent downloads of
  one shard each finish their own copy and the last rename wins. Temporaries of killed runs
  are removed by the next eviction;
- LRU with a size limit: every use touches the file's mtime; after a download, the least
  recently used shards are deleted until the directory fits (a reader that has one open keeps
  reading it: POSIX unlink), never the one just fetched. A copy is handed out open, opened
  before any eviction can reach it: another worker's eviction between finding a copy and
  opening it would have made the open fail;
- no secrets on disk: a file is named by a hash of its URL without user info and without the
  query parameters of pre-signed URLs (the rest of the query is kept in the hash) and the URL's
  base name, and nothing else is written.

Shards are taken as immutable, as WebDataset's cache does, with one check: a copy is named by
what the manifest records of the shard as well (its sha256 where recorded), and a copy of
another size than the recorded one is fetched again; a download of another size or digest than
the manifest's is an error. So a shard rewritten at the same URL is not read from a stale copy:
a rewrite keeps a tar's size more often than not (tar pads to 10 KiB records), and the copy of
the old bytes was read at the new manifest's offsets.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional

from data_pipeline import progress, remote
from data_pipeline.errors import DataError

_TMP = ".part-"
TAR_BLOCK = 512
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# Query parameters of pre-signed URLs (S3, GCS, CloudFront, Azure SAS, bearer tokens): they
# change with every signing, not with the object, so they are no part of a copy's name.
_SIGNING = re.compile(r"x-amz-.*|x-goog-.*|signature|expires|key-pair-id|policy|(access_)?token|sig|se|st|sv|sp|"
                      r"sr|spr|si|ss|srt|skoid|sktid|skt|ske|sks|skv|sdd", re.IGNORECASE)


class Recorded(NamedTuple):
    """What a manifest records of a shard (`ShardInfo.bytes`, `.sha256`): 0 and "" where unknown."""

    bytes: int = 0
    sha256: str = ""


def cache_name(url: str, recorded: Recorded = Recorded()) -> str:
    """File name of a URL's copy: hash of the URL without credentials or signing parameters
    (the rest of its query is kept: `/get?id=0` and `/get?id=1` are two objects) and of the
    manifest's sha256 of the shard (another version: another copy), then its base name."""
    base = remote.redact(url.split("?", 1)[0])
    kept = [(k, v) for k, v in urllib.parse.parse_qsl(url.partition("?")[2], keep_blank_values=True)
            if not _SIGNING.fullmatch(k)]
    plain = base + ("?" + urllib.parse.urlencode(kept) if kept else "")
    plain += f"#{recorded.sha256}" if recorded.sha256 else ""
    digest = hashlib.sha256(plain.encode()).hexdigest()[:16]
    return f"{digest}-{_UNSAFE.sub('_', base.rsplit('/', 1)[-1])[-80:]}"


def cached_copy(url: str, directory: str, max_bytes: int, recorded: Recorded = Recorded()) -> BinaryIO:
    """The local copy of `url` in `directory`, open for reading, downloaded first when absent
    or not of the manifest's size (`recorded`: see `Recorded`): a shard rewritten at the same
    URL is fetched again once, and DataError if it still differs from its manifest (in size or
    sha256)."""
    path = Path(directory) / cache_name(url, recorded)
    found = _open_fresh(path, recorded.bytes)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    fs, inner = remote.filesystem(url)
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=path.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, fs.open(inner, "rb", block_size=remote.DOWNLOAD_BLOCK) as src:
            expected = src.size
            while chunk := src.read(remote.DOWNLOAD_BLOCK):
                out.write(chunk)
                digest.update(chunk)
                progress.step()
            written = out.tell()
        if expected is not None and written != expected:
            raise OSError(f"download of {remote.redact(url)} stopped at {written} of {expected} bytes")
        if expected is None and written < recorded.bytes:  # no Content-Length: the connection closed early
            raise OSError(f"download of {remote.redact(url)} stopped at {written} of the {recorded.bytes} bytes its "
                          f"manifest records (the server sent no Content-Length)")
        _check_size(url, written, recorded.bytes)
        _check_digest(url, digest.hexdigest(), recorded.sha256)
        if expected is None and not recorded.bytes and not ends_as_tar(tmp, written):
            raise OSError(f"download of {remote.redact(url)} ended at {written} bytes without a tar archive's end "
                          f"(two zero blocks): the connection closed early? (the server sent no Content-Length, "
                          f"and no manifest records the shard's size)")
        copy = open(tmp, "rb")  # the file, whatever evicts its name from here on
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    evict(directory, max_bytes, keep=path.name)
    return copy


def _open_fresh(path: Path, expected_size: int) -> Optional[BinaryIO]:
    """The cached copy, open, where it exists and has the manifest's size (a use: touched);
    a copy of another size is an older version of the shard and is deleted."""
    try:
        copy = open(path, "rb")
    except FileNotFoundError:
        return None
    if expected_size and os.fstat(copy.fileno()).st_size != expected_size:
        copy.close()
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # a use: most recently used now
    except FileNotFoundError:  # evicted by another worker since the open: still readable
        pass
    return copy


def ends_as_tar(path: str, size: int) -> bool:
    """Whether the file ends as a whole tar archive does: 512-byte blocks, the last two of them
    zero (POSIX.1 ustar's end of archive; tarfile and GNU tar pad further with zero blocks).
    The check of a download that no size can be checked against: a server that sends no
    Content-Length ends its body by closing the connection, so a connection lost midway read
    as the whole shard and was cached as it, its missing samples skipped every epoch."""
    if size < 2 * TAR_BLOCK or size % TAR_BLOCK:
        return False
    with open(path, "rb") as f:
        f.seek(size - 2 * TAR_BLOCK)
        return not any(f.read(2 * TAR_BLOCK))


def _check_size(url: str, size, expected_size: int) -> None:
    if expected_size and size is not None and size != expected_size:
        raise DataError(f"{remote.redact(url)} is {size} bytes but its manifest records {expected_size}: the "
                        f"shard was rewritten after its manifest; write the manifest again (dit data inspect "
                        f"DIR --write-manifest) or restore the shard")


def _check_digest(url: str, sha256: str, recorded: str) -> None:
    if recorded and sha256 != recorded:
        raise DataError(f"{remote.redact(url)} has sha256 {sha256[:12]}... but its manifest records {recorded[:12]}...: "
                        f"the shard was rewritten after its manifest; write the manifest again (dit data inspect "
                        f"DIR --write-manifest) or restore the shard")


def evict(directory: str, max_bytes: int, keep: str = "") -> None:
    """Delete least recently used copies until the directory holds at most `max_bytes`;
    temporaries not written to for an hour are left-overs of killed runs."""
    entries = []
    for entry in os.scandir(directory):
        try:
            st = entry.stat()
        except FileNotFoundError:  # evicted by another worker meanwhile
            continue
        if entry.name.startswith(_TMP):
            if st.st_mtime < time.time() - 3600:
                Path(entry.path).unlink(missing_ok=True)
            continue
        entries.append((st.st_mtime, st.st_size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if entry.name != keep:
            Path(entry.path).unlink(missing_ok=True)
            total -= size


def open_shard(path: str, options: remote.RemoteOptions, recorded: Recorded = Recorded()):
    """A binary file object with read/seek/close (`size` attribute None when unknown): a pipe's
    output, the cached copy of a remote shard when `data.cache_dir` is set, else the remote
    file read ahead in blocks (streamed front to back where the server gives no size), or the
    local file. A remote shard whose size is not the manifest's (`recorded`) is a DataError:
    its samples are not those the manifest's counts and byte index describe."""
    if remote.is_pipe(path):
        return remote.PipeFile(path[len(remote.PIPE):])
    if remote.is_url(path) and options.cache_dir:
        return cached_copy(path, options.cache_dir, options.cache_max_bytes, recorded)
    if remote.is_url(path):
        fs, inner = remote.filesystem(path)
        f = fs.open(inner, "rb", block_size=options.block_size, cache_type="readahead")
        if getattr(f, "size", None) is None:  # served without a size: streamed, forward only
            return remote.StreamFile(f, path)
        try:
            _check_size(path, remote.file_size(f), recorded.bytes)
        except DataError:
            f.close()
            raise
        return f
    return open(path, "rb")
