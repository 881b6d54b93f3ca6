"""A local cache of remote shards with a size limit (`data.cache_dir`, `data.cache_max_gb`).

A remote shard (s3://, gs://, https://) is downloaded whole into the cache directory the first
time a worker opens it; later opens (next epochs, other workers and ranks of the machine) read
the local copy. fsspec's `simplecache`/`filecache` do the downloading part, but they write
straight to the final file name (a killed run leaves a half shard that later reads as
truncated) and have no size limit, so this is a small wrapper instead:

- atomic: a download goes to a temporary name in the same directory and is renamed when
  complete and of the remote's size; concurrent downloads of one shard each finish their own
  copy and the last rename wins. Temporaries of killed runs are removed by the next eviction;
- LRU with a size limit: every use touches the file's mtime; after a download, the least
  recently used shards are deleted until the directory fits (a reader that has one open keeps
  reading it: POSIX unlink), never the one just fetched;
- no secrets on disk: a file is named by a hash of its URL without user info or query string
  (pre-signed tokens) and the URL's base name, and nothing else is written.

Shards are taken as immutable, as WebDataset's cache does: a changed shard needs a new name or
a cleared cache directory.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from data_pipeline import remote

_TMP = ".part-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def cache_name(url: str) -> str:
    """File name of a URL's copy: hash of the URL without credentials, then its base name."""
    plain = remote.redact(url).split("?", 1)[0]
    digest = hashlib.sha256(plain.encode()).hexdigest()[:16]
    return f"{digest}-{_UNSAFE.sub('_', plain.rsplit('/', 1)[-1])[-80:]}"


def cached_copy(url: str, directory: str, max_bytes: int) -> str:
    """Path of the local copy of `url` in `directory`, downloaded first when absent."""
    path = Path(directory) / cache_name(url)
    try:
        os.utime(path)  # a use: most recently used now
        return str(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fs, inner = remote.filesystem(url)
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, fs.open(inner, "rb", block_size=remote.DOWNLOAD_BLOCK) as src:
            expected = src.size
            while chunk := src.read(remote.DOWNLOAD_BLOCK):
                out.write(chunk)
            written = out.tell()
        if expected is not None and written != expected:
            raise OSError(f"download of {remote.redact(url)} stopped at {written} of {expected} bytes")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    evict(directory, max_bytes, keep=path.name)
    return str(path)


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


def open_shard(path: str, options: remote.RemoteOptions):
    """A binary file object with read/seek/close (`size` attribute None when unknown): a pipe's
    output, the cached copy of a remote shard when `data.cache_dir` is set, else the remote
    file read ahead in blocks, or the local file."""
    if remote.is_pipe(path):
        return remote.PipeFile(path[len(remote.PIPE):])
    if remote.is_url(path) and options.cache_dir:
        return open(cached_copy(path, options.cache_dir, options.cache_max_bytes), "rb")
    if remote.is_url(path):
        fs, inner = remote.filesystem(path)
        return fs.open(inner, "rb", block_size=options.block_size, cache_type="readahead")
    return open(path, "rb")
