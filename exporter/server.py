"""HTTP endpoint: serves the latest snapshot's bytes and never touches the database."""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class SnapshotSource(Protocol):
    snapshot: Snapshot


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "resource-exporter"
    timeout = 30  # a silent client (or a stalled TLS handshake) does not hold a thread forever
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK of the first: a flat 40 ms on every small (e.g. gzip) response.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in PUBLIC_PATHS:
            self._send(200, "text/plain; charset=utf-8", b"OK\n")
        elif self.server.auth is not None and not self.server.auth(
            self.headers.get("Authorization")
        ):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="resource-exporter"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/metrics":
            self._metrics()
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", LANDING_PAGE)
        else:
            self._send(404, "text/plain; charset=utf-8", b"Not Found\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _metrics(self) -> None:
        snapshot = self.server.source.snapshot
        openmetrics = "application/openmetrics-text" in self.headers.get("Accept", "")
        compressed = "gzip" in self.headers.get("Accept-Encoding", "")
        body = snapshot.body(openmetrics=openmetrics, compressed=compressed)
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
        self._send(200, content_type, body, gzip=compressed)

    def _send(self, status: int, content_type: str, body: bytes, gzip: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of scrapers, which then
    # retry after a second: a p99 of ~1 s with 50 concurrent clients.
    request_queue_size = 1024
    source: SnapshotSource
    auth: Callable[[str | None], bool] | None = None

    def handle_error(self, request: object, client_address: object) -> None:
        """Log one line instead of socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
            log.debug("client went away: %r", exc)  # a scraper timed out or hung up
        else:
            event(
                log,
                logging.ERROR,
                "request failed",
                client=client_address,
                **error_fields(exc or Exception("unknown")),
            )


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serve ``/metrics`` from ``source.snapshot`` in a background thread."""

    def __init__(
        self, source: SnapshotSource, listen: str, port: int, web_config: Path | None = None
    ) -> None:
        server_class = _Server6 if ":" in listen else _Server
        self._httpd = server_class((listen, port), _Handler)
        self._httpd.source = source
        self.tls = False
        if web_config is not None:
            config = load_web_config(web_config)
            if config.basic_auth_users:
                self._httpd.auth = BasicAuth(config.basic_auth_users)
            if config.tls_server_config is not None:
                ctx = tls_context(config.tls_server_config, web_config.parent)
                # The handshake runs in the request's thread, on its first read.
                self._httpd.socket = ctx.wrap_socket(
                    self._httpd.socket, server_side=True, do_handshake_on_connect=False
                )
                self.tls = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)
