"""A fake Llama release behind a signed-URL-like path, for testing download.sh.

The server binds to 127.0.0.1 on a free port and serves a tiny copy of the
layout of one family's release (Llama 2 by default, Code Llama or Llama 3)
under ``/dl/`` with real md5 checklists. Requests must
carry the expected ``Signature`` query value, as a signed CDN URL would.
It supports Range requests (206 with Content-Range, 416 past the end) and
records every request so tests can assert what was fetched.

Failure modes, set per test through attributes of :class:`FakeRelease`:

* ``forbidden``: answer 403 to everything;
* ``cut``: ``{path: n}`` - on the first request for *path*, send the full
  headers, then only *n* bytes, then drop the connection;
* ``html``: paths answered with a 200 HTML page instead of the file;
* ``error_text``: paths answered with a 200 plain-text error message;
* ``corrupt``: paths served with one byte flipped (the same one each time);
* ``garbled``: paths served with another byte flipped each time, as a bad
  transfer would;
* ``missing``: paths answered with 404;
* ``flaky``: ``{path: k}`` - the first *k* requests for *path* get a 503;
* ``stall``: ``{path: n}`` - on the first request for *path*, send the full
  headers and *n* bytes, then nothing more until the client goes away
  (recorded in ``dropped``) or ``unstall`` is set (then drop the connection);
* ``bare_416``: answer a Range past the end with a 416 that gives no total (no
  Content-Range), as some servers and proxies do;
* ``no_ranges``: answer every request with the whole file (200), Range or not,
  as a server that can't resume does.
"""

from __future__ import annotations

import hashlib
import random
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SIGNATURE = "SECRETSIG123"
PREFIX = "/dl/"

# Each family's model folders on the server, and their shard counts.
FAMILIES = {
    "llama2": {
        "llama-2-7b": 1,
        "llama-2-13b": 2,
        "llama-2-70b": 8,
        "llama-2-7b-chat": 1,
        "llama-2-13b-chat": 2,
        "llama-2-70b-chat": 8,
    },
    "codellama": {f"CodeLlama-{size}{kind}": n for size, n in (("7b", 1), ("13b", 2), ("34b", 4), ("70b", 8))
                  for kind in ("", "-Python", "-Instruct")},
    "llama3": {"8b_pre_trained": 1, "8b_instruction_tuned": 1, "70b_pre_trained": 8, "70b_instruction_tuned": 8},
}
MODELS = FAMILIES["llama2"]

SHARD_SIZE = 64 * 1024

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>"
    b"<body><h1>This link has expired</h1></body></html>\n"
)

ERROR_TEXT = b"AccessDenied: Request has expired\n"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def build_release(family: str = "llama2", seed: int = 1234) -> dict[str, bytes]:
    """Returns {release path: content} for the whole fake release of a family: Llama 2's tokenizer is shared
    by its models (with a checklist of its own), the others' come with each model (in its checklist), and
    Llama 3's use policy has no .md."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "LICENSE": b"LLAMA COMMUNITY LICENSE AGREEMENT (test copy)\n" * 8,
        "USE_POLICY" + ("" if family == "llama3" else ".md"): b"# Llama Acceptable Use Policy (test copy)\n" * 6,
    }
    if family == "llama2":
        # a binary blob, like the real sentencepiece model
        files["tokenizer.model"] = b"\n\x0e" + rng.randbytes(500)
        files["tokenizer_checklist.chk"] = f"{_md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    for model, shards in FAMILIES[family].items():
        for i in range(shards):
            # starts like a zip archive, as torch.save files do
            files[f"{model}/consolidated.{i:02d}.pth"] = b"PK\x03\x04" + rng.randbytes(SHARD_SIZE - 4)
        files[f"{model}/params.json"] = b'{"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-05, "vocab_size": -1}'
        if family != "llama2":
            files[f"{model}/tokenizer.model"] = rng.randbytes(300)
        names = sorted(f.split("/", 1)[1] for f in files if f.startswith(model + "/"))
        files[f"{model}/checklist.chk"] = "".join(f"{_md5(files[f'{model}/{n}'])}  {n}\n" for n in names).encode()
    return files


class FakeRelease:
    """The served release, the failure modes and the request log."""

    def __init__(self, family: str = "llama2") -> None:
        self.files = build_release(family)
        self.forbidden = False
        self.cut: dict[str, int] = {}
        self.html: set[str] = set()
        self.error_text: set[str] = set()
        self.corrupt: set[str] = set()
        self.garbled: set[str] = set()
        self.missing: set[str] = set()
        self.flaky: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.bare_416 = False
        self.no_ranges = False
        self.unstall = threading.Event()
        self.dropped: list[str] = []  # stalled paths whose client closed the connection
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "FakeRelease":
        release = self

        class Handler(_Handler):
            pass

        Handler.release = release
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.unstall.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The signed URL, as Meta's email gives it."""
        return (
            f"http://127.0.0.1:{self.port}{PREFIX}*"
            f"?Policy=eyJTdGF0ZW1lbnQiOlt7IlJlc291cmNl&Signature={SIGNATURE}"
            f"&Key-Pair-Id=K3EXAMPLEKEYPAIR"
        )

    # -- helpers for tests
    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()

    def requested_paths(self) -> list[str]:
        with self.lock:
            return [p for _, p, _ in self.requests]

    def ranges_for(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for _, p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    release: FakeRelease
    server_version = "FakeCDN/1.0"

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _send(self, code: int, body: bytes, ctype: str, send_body: bool, extra=()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        rel = self.release
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path[len(PREFIX):] if parts.path.startswith(PREFIX) else None
        rng = self.headers.get("Range")
        with rel.lock:
            rel.requests.append((self.command, path or parts.path, rng))
            cut = rel.cut.pop(path, None) if path is not None else None
            stall = rel.stall.pop(path, None) if path is not None else None
            flaky = rel.flaky.get(path, 0) if path is not None else 0
            if flaky:
                rel.flaky[path] = flaky - 1
        denied = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>\n"
        if rel.forbidden or query.get("Signature") != [SIGNATURE] or path is None:
            self._send(403, denied, "application/xml", body)
            return
        if flaky:
            self._send(503, b"<html>busy</html>", "text/html", body)
            return
        if path in rel.missing or path not in rel.files:
            self._send(404, b"<html>not found</html>", "text/html", body)
            return
        if path in rel.html:
            self._send(200, HTML_PAGE, "text/html; charset=utf-8", body)
            return
        if path in rel.error_text:
            self._send(200, ERROR_TEXT, "text/plain", body)
            return
        data = rel.files[path]
        if path in rel.corrupt or path in rel.garbled:
            pos = len(data) // 2 if path in rel.corrupt else len(rel.requests) * 7919 % len(data)
            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
        start = 0
        code = 200
        extra = [("Accept-Ranges", "bytes")]
        if rng and not rel.no_ranges:
            spec = rng.strip()
            assert spec.startswith("bytes="), spec
            first, _, last = spec[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                self._send(416, b"", "text/plain", body,
                           [] if rel.bare_416 else [("Content-Range", f"bytes */{len(data)}")])
                return
            end = min(end, len(data) - 1)
            extra.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
            data = data[start:end + 1]
            code = 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        if stall is not None:
            self.wfile.write(data[:stall])
            self.wfile.flush()
            self._stall(path)
            return
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            # drop the connection midway, as a flaky network would
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(data)

    def _stall(self, path: str) -> None:
        """Sends nothing more until the client closes the connection or the test sets ``unstall``."""
        rel = self.release
        while not rel.unstall.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if not readable:
                continue
            try:
                gone = self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                gone = True
            if gone:
                with rel.lock:
                    rel.dropped.append(path)
                break
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
