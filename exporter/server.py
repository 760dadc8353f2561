"""HTTP endpoint: serves the latest snapshot's bytes and never touches the database.

One asyncio event loop in a background thread serves every connection. A scrape only looks up
bytes rendered by the last refresh, so there is nothing to run in parallel, and a thread per
connection (http.server) spent its time handing the GIL around: 50 concurrent scrapers saw a
p99 ten times this loop's. Only the bcrypt check of a new login leaves the loop (a thread).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from exporter.logs import error_fields, event
from exporter.snapshot import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Snapshot
from exporter.webconfig import BasicAuth, load_web_config, tls_context

log = logging.getLogger(__name__)

LANDING_PAGE = b"""<!doctype html>
<html><head><title>Resource Intelligence exporter</title></head>
<body><h1>Resource Intelligence exporter</h1>
<p>LLM spend, tokens, impact and waste of the SciDEX ledger.</p>
<p><a href="/metrics">Metrics</a></p></body></html>
"""

PUBLIC_PATHS = ("/-/healthy", "/-/ready")
"""Liveness endpoints stay open under basic auth (container health checks), and say nothing."""

IDLE_TIMEOUT_SECONDS = 30.0
"""A silent client (or one that stopped reading), or a stalled TLS handshake, is dropped after
this long (checked every sixth of it)."""
MAX_HEAD_BYTES = 16384
"""Request line and headers; a scraper sends a few hundred bytes."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}
_TEXT = "text/plain; charset=utf-8"


class SnapshotSource(Protocol):
    snapshot: Snapshot


class _Request:
    """The parts of an HTTP/1.x request head that this server acts on."""

    __slots__ = ("headers", "keep_alive", "method", "path")

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")  # ValueError: not HTTP
        if not version.startswith("HTTP/1."):
            raise ValueError(version)
        self.method = method
        self.path = target.split("?", 1)[0]
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line)
            self.headers[name.strip().lower()] = value.strip()
        connection = self.headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = connection == "keep-alive"
        else:
            self.keep_alive = connection != "close"
        if self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers:
            self.keep_alive = False  # a body nobody reads: answer, then hang up


class _Connection(asyncio.Protocol):
    """One client connection. Requests are answered in order (pipelining works); the answer to
    a scrape is bytes the refresh already rendered, so it is written from ``data_received``."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiting = False  # a login is being checked; later requests wait their turn
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Responses leave in one write; do not let the kernel hold back a small one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("client went away: %r", exc)  # a scraper timed out or hung up
        self.server.connections.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        """The client is not reading: stop reading (and answering) its requests meanwhile."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.last_active = time.monotonic()
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.buffer += data
        self.process()

    def process(self) -> None:
        while self.transport is not None and not self.waiting:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.finish(_response(431, _TEXT, b"Request header too large\n", close=True))
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            try:
                request = _Request(head)
            except ValueError:
                self.finish(_response(400, _TEXT, b"Bad Request\n", close=True))
                return
            if self.server.auth is not None and request.path not in PUBLIC_PATHS:
                # bcrypt takes ~50-100 ms by design: off the loop, so other scrapes go on.
                self.waiting = True
                check = asyncio.get_running_loop().run_in_executor(
                    None, self.server.auth, request.headers.get("authorization")
                )
                check.add_done_callback(functools.partial(self.checked, request))
                return
            self.respond(request)

    def checked(self, request: _Request, done: asyncio.Future[bool]) -> None:
        self.waiting = False
        if self.transport is None:
            return
        if done.exception() is None and done.result():
            self.respond(request)
        else:
            self.send(
                request,
                _response(
                    401,
                    _TEXT,
                    b"",
                    close=not request.keep_alive,
                    authenticate='Basic realm="resource-exporter"',
                ),
            )
        self.process()

    def respond(self, request: _Request) -> None:
        try:
            self.send(request, _answer(self.server.source, request))
        except Exception as exc:  # one line per failed request, never a traceback
            peer = self.transport.get_extra_info("peername") if self.transport else None
            event(log, logging.ERROR, "request failed", client=peer, **error_fields(exc))
            self.finish(b"")

    def send(self, request: _Request, response: bytes) -> None:
        if request.keep_alive:
            assert self.transport is not None
            self.transport.write(response)
        else:
            self.finish(response)

    def finish(self, response: bytes) -> None:
        """Write a last response and close once it is sent."""
        if self.transport is not None:
            self.transport.write(response)
            self.transport.close()
            self.transport = None


def _answer(source: SnapshotSource, request: _Request) -> bytes:
    """The response to an authorized request."""
    close = not request.keep_alive
    head_only = request.method == "HEAD"
    if request.method not in ("GET", "HEAD"):
        return _response(405, _TEXT, b"Method Not Allowed\n", close=close, allow="GET, HEAD")
    if request.path == "/metrics":
        snapshot = source.snapshot
        openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
        compressed = "gzip" in request.headers.get("accept-encoding", "")
        body = snapshot.body(openmetrics=openmetrics, compressed=compressed)
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
        return _response(200, content_type, body, close=close, head_only=head_only, gzip=compressed)
    if request.path in PUBLIC_PATHS:
        return _response(200, _TEXT, b"OK\n", close=close, head_only=head_only)
    if request.path == "/":
        return _response(
            200, "text/html; charset=utf-8", LANDING_PAGE, close=close, head_only=head_only
        )
    return _response(404, _TEXT, b"Not Found\n", close=close, head_only=head_only)


def _response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    close: bool,
    head_only: bool = False,
    gzip: bool = False,
    allow: str | None = None,
    authenticate: str | None = None,
) -> bytes:
    """Status line, headers and body as one buffer: one write, one TCP segment when small."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "Server: resource-exporter",
        f"Date: {_http_date(int(time.time()))}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    if gzip:
        lines.append("Content-Encoding: gzip")
    if allow:
        lines.append(f"Allow: {allow}")
    if authenticate:
        lines.append(f"WWW-Authenticate: {authenticate}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


@lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """The Date header, formatted once per second."""
    return formatdate(second, usegmt=True)


class MetricsServer:
    """Serve ``/metrics`` from ``source.snapshot`` on an event loop in a background thread."""

    def __init__(
        self,
        source: SnapshotSource,
        listen: str,
        port: int,
        web_config: Path | None = None,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self.source = source
        self.idle_timeout = idle_timeout
        self.auth: Callable[[str | None], bool] | None = None
        self.connections: set[_Connection] = set()
        tls: ssl.SSLContext | None = None
        if web_config is not None:
            config = load_web_config(web_config)
            if config.basic_auth_users:
                self.auth = BasicAuth(config.basic_auth_users)
            if config.tls_server_config is not None:
                tls = tls_context(config.tls_server_config, web_config.parent)
        self.tls = tls is not None
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_loop_error)
        # Bound here, so a taken port fails the constructor, not the background thread.
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_server(
                    lambda: _Connection(self),
                    listen,
                    port,
                    family=socket.AF_INET6 if ":" in listen else socket.AF_INET,
                    # A burst of scrapers must not overflow the accept queue: a dropped SYN is
                    # retried after a second, which becomes everyone's p99.
                    backlog=1024,
                    reuse_address=True,
                    ssl=tls,
                    ssl_handshake_timeout=idle_timeout if tls else None,
                )
            )
        except BaseException:
            self._loop.close()
            raise
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        self._loop.call_later(self.idle_timeout / 6, self._drop_idle)
        self._loop.run_forever()

    def _drop_idle(self) -> None:
        """Close connections silent for the idle timeout (one timer, not one per request)."""
        cutoff = time.monotonic() - self.idle_timeout
        for conn in [c for c in self.connections if c.last_active < cutoff]:
            if conn.transport is not None:
                conn.transport.abort()
        self._loop.call_later(self.idle_timeout / 6, self._drop_idle)

    def stop(self) -> None:
        """Stop accepting, drop open connections and end the loop's thread."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._close)
            self._thread.join(timeout=2)
        else:
            self._close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def _close(self) -> None:
        self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._loop.stop()


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """asyncio's own reports (e.g. a failed TLS handshake) as one line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError | OSError):
        log.debug("connection error: %s %r", context.get("message"), exc)
    else:
        event(log, logging.ERROR, "http server error", message=context.get("message"))
