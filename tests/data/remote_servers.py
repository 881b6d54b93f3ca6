"""Real servers on 127.0.0.1 for the remote-shard tests: a ranged HTTP file server, one that
sends no Content-Length, and an HTTP proxy in front of moto's S3 server. They count the body
bytes they serve per path; the first two can fail the first k GETs of a path (or all of them)
with a 5xx answer."""
from __future__ import annotations

import http.client
import re
import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
ALWAYS = -1


class Recorder:
    """What a server did: body bytes and GET ranges per path; injected failures per path."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes: Counter = Counter()
        self.ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (start, bytes) per GET
        self.fail: dict[str, int] = {}  # path -> GETs still to fail (ALWAYS: every one)
        self.failed: Counter = Counter()

    def reset(self) -> None:
        with self.lock:
            self.bytes.clear()
            self.ranges.clear()
            self.failed.clear()
            self.fail.clear()

    def should_fail(self, path: str) -> bool:
        with self.lock:
            left = self.fail.get(path, 0)
            if left == 0:
                return False
            if left > 0:
                self.fail[path] = left - 1
            self.failed[path] += 1
            return True

    def served(self, path: str, start: int, n: int) -> None:
        with self.lock:
            self.bytes[path] += n
            self.ranges[path].append((start, n))

    def total(self, suffix: str = ".tar") -> int:
        with self.lock:
            return sum(n for p, n in self.bytes.items() if p.endswith(suffix))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    recorder: Recorder

    def log_message(self, *args) -> None:  # quiet
        pass

    def _path(self) -> str:
        return urlsplit(self.path).path

    def _fail(self) -> None:
        body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/xml")
        self.end_headers()
        self.wfile.write(body)


class FileHandler(_Handler):
    """GET/HEAD of files under `root`, with single byte ranges (206) as fsspec asks for."""

    root: Path

    def _file(self):
        p = (self.root / self._path().lstrip("/")).resolve()
        return p if p.is_file() and self.root in p.parents else None

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        if self.recorder.should_fail(self._path()):
            return self._fail()
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        p = self._file()
        if p is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = p.read_bytes()
        start, end, status = 0, len(data), 200
        m = _RANGE.match(self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            status = 206
        chunk = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(chunk)
            self.recorder.served(self._path(), start, len(chunk))


class CloseDelimitedHandler(FileHandler):
    """GET/HEAD of files under `root` as a server without Content-Length answers (HTTP/1.0
    style: the body ends where the connection closes), closing it after `cut[path]` bytes of
    the body where `cut` names the path: a connection lost midway."""

    cut: dict[str, int]

    def _answer(self, body: bool) -> None:
        p = self._file()
        data = p.read_bytes() if p is not None else b""
        self.close_connection = True
        self.send_response(200 if p is not None else 404)
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            sent = data[: self.cut.get(self._path(), len(data))]
            self.wfile.write(sent)
            self.recorder.served(self._path(), 0, len(sent))


class ProxyHandler(_Handler):
    """Forwards every request to `upstream` (host, port), counting GET body bytes."""

    upstream: tuple[str, int]

    def _forward(self) -> None:
        path = self._path()
        if self.command == "GET" and self.recorder.should_fail(path):
            return self._fail()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            if self.command == "GET":
                m = _RANGE.match(self.headers.get("Range", ""))
                self.recorder.served(path, int(m.group(1)) if m else 0, len(data))

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a killed client is expected
            super().handle_error(request, client_address)


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, handler: type, **attrs):
        self.recorder = Recorder()
        cls = type(handler.__name__, (handler,), {"recorder": self.recorder, **attrs})
        self.httpd = _Quiet(("127.0.0.1", 0), cls)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def file_server(root: Path) -> Server:
    return Server(FileHandler, root=root.resolve())


def close_delimited_server(root: Path, cut: dict[str, int]) -> Server:
    return Server(CloseDelimitedHandler, root=root.resolve(), cut=cut)


def proxy(host: str, port: int) -> Server:
    return Server(ProxyHandler, upstream=(host, port))
