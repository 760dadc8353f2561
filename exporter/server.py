"""HTTP endpoint: serves the latest snapshot's bytes and never touches the database.

One asyncio event loop in a background thread serves every connection. A scrape only looks up
bytes rendered by the last refresh, so there is nothing to run in parallel, and a thread per
connection (http.server) spent its time handing the GIL around: 50 concurrent scrapers saw a
p99 ten times this loop's. Only the bcrypt check of a new login leaves the loop (a small pool).

What one client may cost is bounded (``http`` in exporter/config.py, docs/security.md): the
bytes and the time of a request head, the responses in flight on a connection (192 kB of
one while the client does not read), the connections (the least useful one makes room for a
new one), and the logins waiting for bcrypt (the rest are shed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import resource
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

from exporter.config import ConfigError, HttpLimits
from exporter.logs import error_fields, event
from exporter.snapshot import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Snapshot
from exporter.webconfig import BasicAuth, WebConfig, load_web_config, tls_context

log = logging.getLogger(__name__)

LANDING_PAGE = b"""<!doctype html>
<html><head><title>Resource Intelligence exporter</title></head>
<body><h1>Resource Intelligence exporter</h1>
<p>LLM spend, tokens, impact and waste of the SciDEX ledger.</p>
<p><a href="/metrics">Metrics</a></p></body></html>
"""

PUBLIC_PATHS = ("/-/healthy", "/-/ready")
"""Liveness and readiness stay open under basic auth (container health checks), and say
nothing: ``/-/healthy`` answers while the process serves; ``/-/ready`` only while the data it
serves is younger than ``max_staleness_seconds`` (503 before the first good refresh, and once
the database has been out of reach that long)."""


FD_RESERVE = 64
"""File descriptors kept for the database, log files and the TLS handshakes in progress."""


def connection_cap(limits: HttpLimits) -> int:
    """The connection cap: as configured, or below the process' file descriptor limit."""
    if limits.max_connections:
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10000
    return max(8, min(10000, soft - FD_RESERVE))


ANSWER_PIECE = 128 * 1024
"""The most of an answer handed to the transport at once; the next piece goes once the
transport holds less than ``WRITE_BUFFER``, so a connection whose client does not read holds
at most ``WRITE_BUFFER`` and a piece (192 kB; over TLS about as much again in the socket's
buffer under TLS's). A whole answer handed over at once was copied into the transport's
buffer whenever the kernel did not take it all: a client that asked for the uncompressed text
(856 kB at 10 M rows in the window) and never read held most of it until the idle timeout,
and so did each of an attacker's connections. Prometheus's gzipped answers (about 100 kB)
still leave in one write."""

WRITE_BUFFER = 64 * 1024
"""A transport's high-water mark: above it, the connection pauses (``pause_writing``).
asyncio's own for a socket (TLS's is 512 kB). Pausing as soon as the kernel left anything
unsent (a mark of 1 byte) cost Prometheus's scrapes at 1 M rows about 1 ms of p99, pausing
and resuming reading that often (docs/operations.md)."""

_BARE_LF_END = re.compile(rb"\n\r?\n")
"""The end of a head whose lines end in a bare LF (RFC 9112 allows refusing it: 400)."""
_CAP_LOG_SECONDS = 60.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class SnapshotSource(Protocol):
    snapshot: Snapshot


class _Response(NamedTuple):
    """A status line and headers, and the body (the snapshot's own bytes: one larger than a
    piece is written from them a piece at a time, never copied whole)."""

    head: bytes
    body: bytes = b""


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
            name, value = name.strip().lower(), value.strip()
            if name == "content-length" and (
                not value.isdigit() or self.headers.get(name, value) != value
            ):
                raise ValueError(line)  # the body's length is ambiguous: RFC 9112 says 400
            self.headers[name] = value
        connection = self.headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = connection == "keep-alive"
        else:
            self.keep_alive = connection != "close"
        if self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers:
            self.keep_alive = False  # a body nobody reads: answer, then hang up


class _Connection(asyncio.Protocol):
    """One client connection. Requests are answered in order (pipelining works); the answer to
    a scrape is bytes the refresh already rendered, so it is written from ``data_received``.
    While the client does not read its answers, nothing more is read or answered."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.lingering: asyncio.Transport | None = None  # answered for the last time (finish)
        self.buffer = b""
        self.waiting = False  # a login is being checked; later requests wait their turn
        self.paused = False  # the client does not read: answer nothing more meanwhile
        self.rest = memoryview(b"")  # what is still to be written of the answer being sent
        self.closing = False  # that answer is the last: close once it is written
        self.last_active = time.monotonic()
        self.head_since: float | None = None  # when the first byte of an awaited head came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream: TCP, or TLS over it
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A response leaves as it is written; do not let the kernel hold back a small one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("client went away: %r", exc)  # a scraper timed out or hung up
        self.server.connections.discard(self)
        self.transport = self.lingering = None
        self.rest = memoryview(b"")  # the snapshot it was part of may go

    def pause_writing(self) -> None:
        """The client is not reading: stop reading and answering its requests meanwhile."""
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.last_active = time.monotonic()
        self.write_rest()
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()
            self.process()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return  # after the last answer: dropped (the idle timeout still runs)
        self.last_active = time.monotonic()
        self.buffer += data
        self.process()

    def process(self) -> None:
        limits = self.server.limits
        while self.transport is not None and not self.waiting and not self.paused:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if _BARE_LF_END.search(self.buffer):  # answer now, not at the idle timeout
                    self.finish(_response(400, _TEXT, b"Bad Request\n", close=True))
                elif len(self.buffer) > limits.head_bytes:
                    self.finish(_response(431, _TEXT, b"Request header too large\n", close=True))
                elif self.buffer and self.head_since is None:
                    self.head_since = time.monotonic()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.head_since = time.monotonic() if self.buffer else None
            if len(head) > limits.head_bytes:
                self.finish(_response(431, _TEXT, b"Request header too large\n", close=True))
                return
            try:
                if head.count(b"\n") != head.count(b"\r\n"):
                    raise ValueError("a line ends in a bare LF")
                request = _Request(head)
            except ValueError:
                self.finish(_response(400, _TEXT, b"Bad Request\n", close=True))
                return
            if self.server.auth is not None and request.path not in PUBLIC_PATHS:
                if not self.authorize(request):
                    return
                continue
            self.respond(request)

    def authorize(self, request: _Request) -> bool:
        """Answer a request that needs a login; False: its check went to the bcrypt pool."""
        auth, header = self.server.auth, request.headers.get("authorization")
        assert auth is not None
        known = auth.cached(header)  # a login seen before, or a malformed header: at once
        if known is True:
            self.respond(request)
        elif known is False:
            self.send(request, _unauthorized(request))
        elif (
            self.server.auth_pending
            >= self.server.limits.auth_workers + self.server.limits.auth_queue
        ):
            # Every worker busy and the queue full: shed at once rather than queue behind.
            self.send(
                request,
                _response(
                    429, _TEXT, b"Too many logins\n", close=not request.keep_alive, retry_after=1
                ),
            )
        else:
            # bcrypt takes ~50-100 ms by design: off the loop, so other scrapes go on.
            self.server.auth_pending += 1
            self.waiting = True
            check = asyncio.get_running_loop().run_in_executor(
                self.server.auth_pool, auth.verify, header
            )
            check.add_done_callback(functools.partial(self.checked, request))
            return False
        return True

    def checked(self, request: _Request, done: asyncio.Future[bool]) -> None:
        self.server.auth_pending -= 1
        self.waiting = False
        if self.transport is None:
            return
        if done.exception() is None and done.result():
            self.respond(request)
        else:
            self.send(request, _unauthorized(request))
        self.process()

    def respond(self, request: _Request) -> None:
        try:
            self.send(request, _answer(self.server.source, request))
        except Exception as exc:  # one line per failed request, never a traceback
            peer = self.transport.get_extra_info("peername") if self.transport else None
            event(log, logging.ERROR, "request failed", client=peer, **error_fields(exc))
            self.finish(_Response(b""))

    def send(self, request: _Request, response: _Response) -> None:
        if request.keep_alive:
            assert self.transport is not None
            self.write(self.transport, response)
        else:
            self.finish(response)

    def write(self, transport: asyncio.Transport, response: _Response) -> None:
        """Write a response whole if its body is at most a piece (in one write: Prometheus's
        gzipped answers), else its head and first piece, the rest following as the client
        reads (``write_rest``), so the transport holds at most ``WRITE_BUFFER`` and a piece."""
        head, body = response
        if len(body) <= ANSWER_PIECE:
            transport.write(head + body)
            return
        view = memoryview(body)
        transport.write(head + view[:ANSWER_PIECE])
        self.rest = view[ANSWER_PIECE:]
        self.write_rest()

    def write_rest(self) -> None:
        """Hand the transport the rest of an answer, a piece at a time, until it says its
        buffer is full (``pause_writing``); after a last answer, close once it is all written."""
        transport = self.transport or self.lingering
        if transport is None:
            return
        while self.rest and not self.paused:
            piece, self.rest = self.rest[:ANSWER_PIECE], self.rest[ANSWER_PIECE:]
            transport.write(piece)
        if self.closing and not self.rest:
            self.closing = False
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def finish(self, response: _Response) -> None:
        """Write a last response and close once it is sent.

        Closing a socket with input it has not read makes the kernel reset the connection,
        which can destroy the response before the client reads it (a 431 to a head over the
        limit, sent on). So, as a web server's lingering close does, only the sending side
        closes; what the client still sends is read and dropped until it hangs up, or until
        the idle timeout (TLS cannot half-close: closed once the response is written)."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        self.lingering, self.buffer, self.closing = transport, b"", True
        self.write(transport, response)
        self.write_rest()  # and close once it is all written

    def abort(self) -> bool:
        """Drop the connection at once, answering or lingering; False if it is gone."""
        transport = self.transport or self.lingering
        if transport is None:
            return False
        transport.abort()
        return True


def _unauthorized(request: _Request) -> _Response:
    return _response(
        401,
        _TEXT,
        b"",
        close=not request.keep_alive,
        authenticate='Basic realm="resource-exporter"',
    )


@lru_cache(maxsize=256)
def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (RFC 9110: q=0 means "not acceptable")."""
    weights = _weights(header)
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


@lru_cache(maxsize=256)
def prefers_openmetrics(header: str) -> bool:
    """Whether an Accept header asks for OpenMetrics rather than the text format: it names
    OpenMetrics with a weight above zero and no lower than the text format's (``text/plain``'s,
    or else a wildcard's). Prometheus sends OpenMetrics at 1 and the text format at 0.5; a
    header that names neither gets the text format, as one that refuses OpenMetrics (q=0)."""
    weights = _weights(header)
    openmetrics = weights.get("application/openmetrics-text", 0.0)
    text = weights.get("text/plain", weights.get("text/*", weights.get("*/*", 0.0)))
    return openmetrics > 0 and openmetrics >= text


def _weights(header: str) -> dict[str, float]:
    """Each value an Accept or Accept-Encoding header names (in lower case, without its
    parameters) and its weight: 1 unless a q parameter says otherwise, 0 for a q that is no
    number, the largest if a value is named twice (OpenMetrics' versions, for Prometheus)."""
    weights: dict[str, float] = {}
    for item in header.split(","):
        value, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(number)
                except ValueError:
                    weight = 0.0
        value = value.lower()
        weights[value] = max(weight, weights.get(value, weight))
    return weights


def _answer(source: SnapshotSource, request: _Request) -> _Response:
    """The response to an authorized request."""
    close = not request.keep_alive
    head_only = request.method == "HEAD"
    if request.method not in ("GET", "HEAD"):
        return _response(405, _TEXT, b"Method Not Allowed\n", close=close, allow="GET, HEAD")
    if request.path == "/metrics":
        snapshot = source.snapshot
        openmetrics = prefers_openmetrics(request.headers.get("accept", ""))
        compressed = accepts_gzip(request.headers.get("accept-encoding", ""))
        body = snapshot.body(openmetrics=openmetrics, compressed=compressed)
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
        return _response(200, content_type, body, close=close, head_only=head_only, gzip=compressed)
    if request.path == "/-/ready" and not source.snapshot.fresh:
        return _response(503, _TEXT, b"Not ready\n", close=close, head_only=head_only)
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
    retry_after: int | None = None,
) -> _Response:
    """Status line, headers and body; in one write when the body is at most a piece."""
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
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return _Response(head) if head_only else _Response(head, body)


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
        limits: HttpLimits | None = None,
    ) -> None:
        self.source = source
        self.limits = limits = limits or HttpLimits()
        self.cap = connection_cap(limits)
        self.auth: BasicAuth | None = None
        self.auth_pool = ThreadPoolExecutor(limits.auth_workers, thread_name_prefix="auth")
        self.auth_pending = 0  # logins at the pool (running or queued); loop thread only
        self.connections: set[_Connection] = set()
        self._evicted = 0
        self._cap_logged = float("-inf")
        tls: ssl.SSLContext | None = None
        self.web_config = web_config
        self._web_files: tuple[Path, ...] = ()  # the config file and the files it names
        self._web_seen: tuple[tuple[float, int] | None, ...] = ()  # their (mtime, size)
        if web_config is not None:
            config = load_web_config(web_config)
            self._watch(config)
            self.auth = _auth(config)
            if config.tls_server_config is not None:
                tls = tls_context(config.tls_server_config, web_config.parent)
        self.tls = tls is not None
        self._tls = tls  # the listening socket's context, for good
        self._tls_current = tls  # the last one loaded: each handshake switches to it
        if tls is not None:
            tls.sni_callback = self._present
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
                    ssl_handshake_timeout=limits.idle_timeout_seconds if tls else None,
                )
            )
        except BaseException:
            self._loop.close()
            self.auth_pool.shutdown(wait=False)
            raise
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def publish(self, snapshot: Snapshot) -> None:
        """Nothing to do: a scrape reads ``source.snapshot`` itself."""

    def running(self) -> bool:
        """Whether the loop's thread still serves (the exporter stops once it does not)."""
        return self._thread.is_alive()

    def exit_status(self) -> None:
        """None: a thread has no exit code (a server process has, ``ServerProcess``)."""

    def _run(self) -> None:
        self._loop.call_later(self._sweep_every, self._sweep)
        self._loop.run_forever()

    @property
    def _sweep_every(self) -> float:
        return min(self.limits.idle_timeout_seconds, self.limits.head_timeout_seconds) / 6

    def admit(self, conn: _Connection) -> None:
        """Count a new connection; at the cap, drop the least useful one to make room."""
        if len(self.connections) >= self.cap:
            victim = _least_useful(self.connections)
            if victim is None or not victim.abort():
                conn.abort()
                return
            self.connections.discard(victim)
            self._evicted += 1
            now = time.monotonic()
            if now - self._cap_logged >= _CAP_LOG_SECONDS:
                event(
                    log,
                    logging.WARNING,
                    "connection cap reached",
                    cap=self.cap,
                    dropped=self._evicted,
                )
                self._cap_logged, self._evicted = now, 0
        self.connections.add(conn)

    def reload(self) -> None:
        """Read the web config again (it changed, or SIGHUP): new users and passwords, and a
        new certificate and key for the handshakes to come. A file that does not load leaves
        the running configuration as it was, with one line saying why; connections stay."""
        if self.web_config is None:
            return
        self._web_seen = tuple(_stat(path) for path in self._web_files)
        try:
            config = load_web_config(self.web_config)
            if (config.tls_server_config is not None) != self.tls:
                raise ConfigError("turning TLS on or off needs a restart")
            tls = config.tls_server_config
            ctx = None if tls is None else tls_context(tls, self.web_config.parent)
            auth = _auth(config)
        except (ConfigError, ssl.SSLError, OSError) as exc:
            event(log, logging.ERROR, "web config not reloaded", error=str(exc))
            return
        self._watch(config)
        self._loop.call_soon_threadsafe(self._use, auth, ctx)
        event(log, logging.INFO, "web config reloaded", users=len(config.basic_auth_users))

    def _use(self, auth: BasicAuth | None, ctx: ssl.SSLContext | None) -> None:
        """Take a reloaded configuration, on the loop, where every handshake starts."""
        self.auth = auth
        if ctx is not None and self._tls is not None:
            # A connection copies the version floor and whether to ask for a client
            # certificate from the listening context when it is accepted; the rest comes
            # from ``ctx`` in :meth:`_present`.
            self._tls.minimum_version = ctx.minimum_version
            self._tls.verify_mode = ctx.verify_mode
            self._tls_current = ctx

    def _present(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        """Switch a handshake to the last loaded certificate, key and client CA (OpenSSL calls
        this for every ClientHello, with a server name or without). Loading new files into
        the listening context instead changes its certificate and key in two steps, and a
        handshake started between them fails; a switch of contexts is one reference."""
        current = self._tls_current
        if current is not None and current is not self._tls:
            conn.context = current

    def reload_soon(self) -> None:
        """Read the web config again in a worker thread (for SIGHUP's handler, which runs in
        the main thread between two bytecodes and should not load files and log there)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: stopping anyway
            self._loop.call_soon_threadsafe(self._loop.run_in_executor, self.auth_pool, self.reload)

    def _watch(self, config: WebConfig) -> None:
        """Watch the config file and the certificate, key and CA files it names."""
        assert self.web_config is not None
        base, tls = self.web_config.parent, config.tls_server_config
        named = () if tls is None else (tls.cert_file, tls.key_file, tls.client_ca_file)
        self._web_files = (self.web_config, *(base / p for p in named if p is not None))
        self._web_seen = tuple(_stat(path) for path in self._web_files)

    def _web_config_changed(self) -> bool:
        return tuple(_stat(path) for path in self._web_files) != self._web_seen

    def _sweep(self) -> None:
        """Drop connections silent for the idle timeout, or trickling a head past its deadline
        (one timer, not one per request); notice a changed web config."""
        if self._web_config_changed():
            # bcrypt for the dummy hash and certificate loading take a moment: off the loop.
            self._loop.run_in_executor(self.auth_pool, self.reload)
        now = time.monotonic()
        idle = now - self.limits.idle_timeout_seconds
        head = now - self.limits.head_timeout_seconds
        for conn in list(self.connections):
            late = conn.head_since is not None and conn.head_since < head
            if conn.last_active < idle or late:
                conn.abort()
        self._loop.call_later(self._sweep_every, self._sweep)

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
        self.auth_pool.shutdown(wait=False, cancel_futures=True)

    def _close(self) -> None:
        self._server.close()
        for conn in list(self.connections):
            conn.abort()
        self._loop.stop()


def _auth(config: WebConfig) -> BasicAuth | None:
    return BasicAuth(config.basic_auth_users) if config.basic_auth_users else None


def _stat(path: Path) -> tuple[float, int] | None:
    """What tells that a file changed: its modification time and size."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime, info.st_size)


def _least_useful(connections: set[_Connection]) -> _Connection | None:
    """The connection trickling a head the longest, or else the one idle the longest; never
    one whose login is being checked."""
    trickling = [c for c in connections if c.head_since is not None and not c.waiting]
    if trickling:
        return min(trickling, key=lambda c: c.head_since or 0.0)
    idle = [c for c in connections if not c.waiting]
    return min(idle, key=lambda c: c.last_active, default=None)


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """asyncio's own reports (e.g. a failed TLS handshake) as one line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError | OSError):
        log.debug("connection error: %s %r", context.get("message"), exc)
    else:
        event(log, logging.ERROR, "http server error", message=context.get("message"))
