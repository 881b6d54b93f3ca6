"""Shards that are not local files: object stores and HTTP through fsspec, and `pipe:` commands.

`s3://`, `gs://`, `http(s)://` (any fsspec protocol) are opened with `fsspec.open` and a
bounded read-ahead buffer (`block_size` bytes), so a seek is a ranged read of the next block:
a worker that owns the second half of a shard never downloads the first. Credentials come from
each store's usual environment and profiles (s3fs: AWS_* variables, ~/.aws; gcsfs: Google
application default credentials); none is ever passed through this module, and `redact` strips
user info and query strings (pre-signed tokens) from every path that goes into a message.

`pipe:CMD` (WebDataset's form, e.g. `pipe:aws s3 cp s3://b/x.tar -`) runs CMD in a shell and
reads its standard output forward only: a skip reads and drops the bytes in between, going back
restarts the command.

Transient errors (connection resets, timeouts, 5xx answers) are retried with exponential
backoff by `TarShard`; `ShardUnreadable` is what remains after the last retry.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from data_pipeline import progress

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
PIPE = "pipe:"
DOWNLOAD_BLOCK = 8 << 20  # bytes per read when copying a whole file


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read (data.remote_* of the run config)."""

    block_size: int = 4 << 20  # bytes fetched per ranged read (the read-ahead bound per open shard)
    retries: int = 3  # further attempts after a transient error, per read
    backoff: float = 0.5  # seconds before the first retry, doubled for each further one
    readahead: bool = True  # open the next shard in the background while reading the current one
    cache_dir: str = ""  # local copies of whole shards (shard_cache.py); "" reads the store directly
    cache_max_bytes: int = 0  # size limit of cache_dir
    # A shard still unreadable after the retries: skipped (counted as unreadable_shard), or, where
    # False, a DataError. A transient failure hits one process, so where several ranks must read
    # the same batches a skip on one of them alone would pair different samples (stream.py).
    skip_unreadable: bool = True


def is_pipe(path: str) -> bool:
    return path.startswith(PIPE)


def is_url(path: str) -> bool:
    """A URL fsspec opens (file:// excluded: that is a local path)."""
    m = _URL.match(path)
    return bool(m) and m.group(1).lower() != "file"


def is_remote(path: str) -> bool:
    return is_pipe(path) or is_url(path)


def join(root: str, name: str) -> str:
    """`root`/`name` for directories and URLs alike; `name` alone when root is "" (pipes)."""
    if not root:
        return name
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def common_dir(dirs: list[str]) -> str:
    """The longest common directory of URLs (by path segment) or local directories."""
    if not all(is_url(d) for d in dirs):
        return os.path.commonpath([os.path.abspath(d) for d in dirs])
    parts = [d.rstrip("/").split("/") for d in dirs]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


_USERINFO = re.compile(r"(://)[^/@\s]*@")
_QUERY = re.compile(r"\?[^\s'\"]*")


def redact(text: str) -> str:
    """`text` without URL user info (`user:secret@`) and query strings (signed tokens)."""
    return _QUERY.sub("?<redacted>", _USERINFO.sub(r"\1", text))


_FILESYSTEMS: dict[tuple, object] = {}  # (pid, protocol) -> filesystem of this process


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL: one instance per protocol and process.

    Not fsspec's own instance cache: the loader forks its workers, and an instance made before
    the fork would hand the parent's pooled connections (and event loop) to the children; a
    child makes its own, and never closes (nor uses) the parent's."""
    import fsspec.core

    protocol = _URL.match(url).group(1).lower()
    key = (os.getpid(), protocol)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        try:
            fs = fsspec.core.url_to_fs(url, skip_instance_cache=True)[0]
        except (ImportError, ValueError) as e:  # gs:// without gcsfs, an unknown protocol
            from data_pipeline.errors import DataError

            raise DataError(f"cannot read {protocol}:// shards: {e} (gs:// needs `pip install .[gcs]`)") from None
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(url)


def forget_filesystems() -> None:
    """Drop the filesystems of this process (the next use reads the environment again)."""
    _FILESYSTEMS.clear()


def file_size(f) -> Optional[int]:
    """Size in bytes of a file from `shard_cache.open_shard`; None for pipes and streams."""
    if isinstance(f, ForwardOnly):
        return None
    size = getattr(f, "size", None)
    if size is not None:
        return int(size)
    return os.fstat(f.fileno()).st_size


def exists(path: str) -> bool:
    if is_url(path):
        fs, inner = filesystem(path)
        return fs.exists(inner)
    return os.path.isfile(path)


def size_of(path: str) -> int:
    if is_url(path):
        fs, inner = filesystem(path)
        return int(fs.size(inner))
    return os.path.getsize(path)


def read_text(path: str) -> str:
    """A whole (small) file, local or URL; FileNotFoundError when missing."""
    if is_url(path):
        fs, inner = filesystem(path)
        with fs.open(inner, "rb") as f:
            return f.read().decode()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write a small file to a URL (one PUT: atomic on object stores)."""
    fs, inner = filesystem(path)
    with fs.open(inner, "wb") as f:
        f.write(text.encode())


def put_file(local: str, url: str) -> None:
    """Upload a finished local file (one PUT, or a multipart upload completed at its end)."""
    fs, inner = filesystem(url)
    fs.put_file(local, inner)


def glob_urls(pattern: str) -> list[str]:
    """Sorted URLs matching a glob pattern, with the pattern's protocol."""
    fs, inner = filesystem(pattern)
    return sorted(f if _URL.match(f) else fs.unstrip_protocol(f) for f in fs.glob(inner))


def transient_errors() -> tuple[type, ...]:
    """Exception types worth another attempt: I/O, timeouts, and the stores' client errors
    (missing files and refused permissions are not among them)."""
    kinds: list[type] = [OSError, TimeoutError, EOFError]
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions

        kinds += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    return tuple(kinds)


PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ForwardOnly:
    """A stream read as a file front to back: `seek` forward reads past the bytes between, back
    is an OSError (the reader opens it again). Its size is unknown (None)."""

    size = None

    def __init__(self, name: str):
        self.name = name  # for messages
        self.pos = 0

    def _read(self, size: int) -> bytes:
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        data = self._read(size)
        self.pos += len(data)
        return data

    def seek(self, offset: int) -> None:
        if offset < self.pos:
            raise OSError(f"{redact(self.name)} is read front to back and cannot seek backwards")
        while self.pos < offset:
            if not self.read(min(offset - self.pos, 1 << 20)):
                return  # past the end: the next read comes back short
            progress.step()  # megabytes read past: the stall watch sees it move on


class PipeFile(ForwardOnly):
    """The standard output of a shell command."""

    def __init__(self, command: str):
        super().__init__(f"pipe command {command!r}")
        self.command = command
        self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _read(self, size: int) -> bytes:
        data = self._proc.stdout.read(size)
        if len(data) < size:  # end of output: a failed command is an error, not a short shard
            code = self._proc.wait()
            if code != 0:
                raise OSError(f"pipe command {redact(self.command)!r} exited with status {code}")
        return data

    def close(self) -> None:
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


class StreamFile(ForwardOnly):
    """A remote file served without a size (an HTTP server that sends no Content-Length ends
    the body by closing the connection): fsspec streams it and cannot seek at all."""

    def __init__(self, f, url: str):
        super().__init__(url)
        self._f = f

    def _read(self, size: int) -> bytes:
        return self._f.read(size)

    def close(self) -> None:
        self._f.close()
