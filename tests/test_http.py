"""The /metrics server at the byte level: keep-alive, pipelining, bad requests, slow clients."""

from __future__ import annotations

import gzip
import http.client
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from exporter.server import MAX_HEAD_BYTES, MetricsServer
from exporter.snapshot import Snapshot

TEXT = b"# HELP x_usd X.\n# TYPE x_usd gauge\nx_usd 1.5\n"


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    source = SimpleNamespace(snapshot=Snapshot((), TEXT, gzip.compress(TEXT, mtime=0)))
    srv = MetricsServer(source, "127.0.0.1", 0, idle_timeout=1.2).start()  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()


def _exchange(port: int, raw: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of HTTP/1.1 responses (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers["content-length"])
        out.append((int(lines[0].split(" ")[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def test_keep_alive_serves_many_requests_on_one_connection(server: MetricsServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == TEXT
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        assert resp.getheader("Content-Encoding") == "gzip"
        assert gzip.decompress(resp.read()) == TEXT
        assert resp.getheader("Date", "").endswith(" GMT")
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(server: MetricsServer) -> None:
    data = _exchange(
        server.port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    # HEAD carries the Content-Length of the body it leaves out; frame it by hand.
    first, second, rest = data.split(b"HTTP/1.1 ", 3)[1:]
    assert first.startswith(b"200") and first.endswith(TEXT)
    assert second.startswith(b"404")
    head, healthy = rest.split(b"\r\n\r\n", 1)
    assert head.startswith(b"200") and f"Content-Length: {len(TEXT)}".encode() in head
    [(status, headers, body)] = _responses(healthy)
    assert (status, body, headers["connection"]) == (200, b"OK\n", "close")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES, 431),
    ],
)
def test_bad_requests_get_a_status_and_a_closed_connection(
    server: MetricsServer, raw: bytes, status: int
) -> None:
    responses = _responses(_exchange(server.port, raw))
    assert [r[0] for r in responses] == [status]
    assert responses[0][1]["connection"] == "close"
    # The server is still there for everyone else.
    assert _responses(_exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[0][2] == TEXT


def test_http_1_0_closes_unless_asked_to_keep_alive(server: MetricsServer) -> None:
    assert len(_responses(_exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n"))) == 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /-/ready HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"GET /-/ready HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    assert [r[2] for r in _responses(b"".join(chunks))] == [b"OK\n", b"OK\n"]


def test_silent_clients_are_dropped_after_the_idle_timeout(server: MetricsServer) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its request
        assert sock.recv(1024) == b""  # closed by the server
    assert 1.0 < time.monotonic() - started < 4.0
    assert not server.connections


def test_a_client_that_stops_reading_does_not_hold_up_others() -> None:
    big = b"# many series\n" * 300_000  # 4 MB: more than the socket buffers hold
    source = SimpleNamespace(snapshot=Snapshot((), big, b""))
    srv = MetricsServer(source, "127.0.0.1", 0, idle_timeout=1.2).start()  # type: ignore[arg-type]
    try:
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # and never reads
        started = time.perf_counter()
        for _ in range(5):
            assert _exchange(srv.port, b"GET /-/healthy HTTP/1.0\r\n\r\n").endswith(b"OK\n")
        assert time.perf_counter() - started < 1.0
        time.sleep(2.5)
        assert not srv.connections  # the stalled one was dropped
        stalled.close()
    finally:
        srv.stop()


def test_stop_closes_open_connections_and_the_port(server: MetricsServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    port = server.port
    server.stop()
    assert sock.recv(1024) == b""
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    server.stop()  # twice is harmless (the fixture stops it again)


def test_a_taken_port_fails_at_construction(server: MetricsServer) -> None:
    with pytest.raises(OSError):
        MetricsServer(SimpleNamespace(snapshot=None), "127.0.0.1", server.port)  # type: ignore[arg-type]
