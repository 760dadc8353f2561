"""The /metrics server at the byte level: keep-alive, pipelining, bad requests, slow clients."""

from __future__ import annotations

import gzip
import http.client
import resource
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from exporter.config import HttpLimits
from exporter.server import (
    ANSWER_PIECE,
    FD_RESERVE,
    WRITE_BUFFER,
    MetricsServer,
    connection_cap,
)
from tests.wire import ASK_FOR_TEXT, HUGE, read_head, read_response, serving, wait_until_paused

TEXT = b"# HELP x_usd X.\n# TYPE x_usd gauge\nx_usd 1.5\n"


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    source = serving(TEXT)
    srv = MetricsServer(source, "127.0.0.1", 0, limits=HttpLimits(idle_timeout_seconds=1.2)).start()
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
        ASK_FOR_TEXT + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
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
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * HttpLimits().head_bytes, 431),
        # Complete heads over the limit, arriving in one write.
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-H: v\r\n" * 10_000 + b"\r\n", 431),
        # Two lengths for one body: which one frames the next request is ambiguous.
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 24\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        # Bare LF line endings: rejected at once, not left to the idle timeout.
        (b"GET /metrics HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n", 400),
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
    source = serving(big)
    srv = MetricsServer(source, "127.0.0.1", 0, limits=HttpLimits(idle_timeout_seconds=1.2)).start()
    try:
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(ASK_FOR_TEXT * 20)  # and never reads
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
    sock.sendall(ASK_FOR_TEXT)
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
        MetricsServer(SimpleNamespace(snapshot=None), "127.0.0.1", server.port)


def test_a_repeated_content_length_with_the_same_value_is_one_length(server: MetricsServer) -> None:
    raw = b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
    assert [r[0] for r in _responses(_exchange(server.port, raw + b"GET /x HTTP/1.0\r\n\r\n"))] == [
        200,
        404,
    ]


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0, identity", False),
        ("gzip;q=0.5", True),
        ("identity, *;q=0", False),
        ("*", True),
        ("br, *;q=0.1", True),
        ("deflate", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_gzip_only_when_the_client_accepts_it(
    server: MetricsServer, accept: str, gzipped: bool
) -> None:
    headers, body = _metrics(server, "Accept-Encoding", accept)
    assert (headers.get("content-encoding") == "gzip") is gzipped
    assert (gzip.decompress(body) if gzipped else body) == TEXT


PROMETHEUS_ACCEPT = (  # what Prometheus 2.42 sends
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (PROMETHEUS_ACCEPT, True),
        ("application/openmetrics-text", True),
        ("Application/OpenMetrics-Text; version=1.0.0", True),
        ("application/openmetrics-text, text/plain", True),  # a tie: the one named first
        ("text/*;q=0.1, application/openmetrics-text;q=0.5", True),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("application/json", False),  # neither: the text format, as with no header
        ("application/openmetrics-text;q=0", False),  # not acceptable (RFC 9110)
        ("application/openmetrics-text;q=0.5, text/plain", False),
        ("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.8", False),
        ("application/openmetrics-text;q=0.2, */*;q=0.3", False),
        ("application/openmetrics-text;q=nonsense", False),
    ],
)
def test_openmetrics_when_the_client_prefers_it(
    server: MetricsServer, accept: str, openmetrics: bool
) -> None:
    headers, body = _metrics(server, "Accept", accept)
    om, text = "application/openmetrics-text; version=1.0.0;", "text/plain; version=0.0.4;"
    assert headers["content-type"].startswith(om if openmetrics else text)
    assert body == (b"# EOF\n" if openmetrics else TEXT)  # no families: OpenMetrics' end alone


def _metrics(server: MetricsServer, header: str, value: str) -> tuple[dict[str, str], bytes]:
    """A 200 answer's headers and body to a GET of /metrics with one header."""
    raw = f"GET /metrics HTTP/1.0\r\n{header}: {value}\r\n\r\n".encode()
    ((status, headers, body),) = _responses(_exchange(server.port, raw))
    assert status == 200
    return headers, body


def _server_side(srv: MetricsServer) -> list[Any]:
    return list(srv.connections)


def test_a_client_that_pipelines_and_never_reads_costs_bounded_memory() -> None:
    big = b"# series\n" * 2_000  # 18 kB a response
    source = serving(big)
    srv = MetricsServer(source, "127.0.0.1", 0).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # 2,000 requests in one write, never read: 36 MB of answers if all were made.
            sock.sendall(ASK_FOR_TEXT * 2000)
            wait_until_paused(srv, 1)
            (conn,) = _server_side(srv)
            assert conn.paused
            time.sleep(0.3)
            # What waits to be sent: at most the transport's high-water mark and one answer.
            assert conn.transport.get_write_buffer_size() < 2 * len(big) + 65536
            # The others are served meanwhile.
            assert _exchange(srv.port, b"GET /-/healthy HTTP/1.0\r\n\r\n").endswith(b"OK\n")
            # Reading resumes the answers.
            sock.settimeout(10)
            received = 0
            while received < 2 * len(big):
                chunk = sock.recv(1 << 20)
                assert chunk
                received += len(chunk)
    finally:
        srv.stop()


def _huge_server() -> MetricsServer:
    return MetricsServer(serving(HUGE), "127.0.0.1", 0).start()


def test_clients_that_ask_for_a_large_answer_and_never_read_hold_a_bounded_part_each() -> None:
    """Each connection that asked for the text and does not read holds at most the high-water
    mark and a piece of the answer in its transport's buffer, not the rest of a 16.8 MB answer
    (a copy of it, before), and reading resumes the answer intact."""
    srv = _huge_server()
    socks = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(ASK_FOR_TEXT + b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        wait_until_paused(srv, 4)
        time.sleep(0.3)
        held = sorted(c.transport.get_write_buffer_size() for c in _server_side(srv))
        assert len(held) == 4
        assert held[-1] <= WRITE_BUFFER + ANSWER_PIECE + 1024, held  # the head is under 1 kB
        # Reading resumes the answer, whole and in order, then the one pipelined behind it.
        for sock in socks[:2]:
            headers, body = read_response(sock)
            assert "content-encoding" not in headers
            assert int(headers["content-length"]) == len(HUGE)
            assert body == HUGE
            assert read_response(sock)[1] == b"OK\n"
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


def test_a_large_last_answer_is_written_whole_before_the_connection_closes() -> None:
    srv = _huge_server()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            time.sleep(0.5)  # the answer waits for the client: the transport is paused
            headers, body = read_response(sock)
            assert headers["connection"] == "close" and body == HUGE
            assert sock.recv(1) == b""  # and then the server closed
    finally:
        srv.stop()


def test_large_answers_pipelined_behind_each_other_arrive_whole_and_in_order() -> None:
    """Each answer waits until the one before is written, however many pauses that takes; a
    HEAD among them carries no body, and the last one closes the connection once written."""
    srv = _huge_server()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(
                ASK_FOR_TEXT
                + b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            time.sleep(0.3)  # the first answer waits for the client
            assert read_response(sock)[1] == HUGE
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % len(HUGE) in head
            headers, body = read_response(sock)
            assert headers["connection"] == "close" and body == HUGE
            assert sock.recv(1) == b""
    finally:
        srv.stop()


def test_a_client_that_trickles_a_head_is_dropped_at_the_head_deadline() -> None:
    source = serving(TEXT)
    limits = HttpLimits(head_timeout_seconds=0.6, idle_timeout_seconds=30)
    srv = MetricsServer(source, "127.0.0.1", 0, limits=limits).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.settimeout(0.2)
            closed = False
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x" * 4:  # 8 s of trickling at most
                try:
                    sock.sendall(bytes([byte]))
                    closed = sock.recv(1024) == b""
                except TimeoutError:
                    continue
                except ConnectionError:
                    closed = True
                if closed:
                    break
            assert closed  # by the server, long before the idle timeout
        # A request that keeps coming, each head within the deadline, is never cut.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            for _ in range(4):
                sock.sendall(b"GET /-/healthy HTTP/1.1\r\n")
                time.sleep(0.2)
                sock.sendall(b"Host: x\r\n\r\n")
                assert sock.recv(1024).endswith(b"OK\n")
                time.sleep(0.5)
    finally:
        srv.stop()


def test_at_the_connection_cap_tricklers_make_room_and_a_scrape_gets_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = serving(TEXT)
    limits = HttpLimits(max_connections=10)
    srv = MetricsServer(source, "127.0.0.1", 0, limits=limits).start()
    tricklers = []
    try:
        for _ in range(25):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost")  # and never more
            tricklers.append(sock)
            time.sleep(0.01)
        for _ in range(3):
            assert _responses(_exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[0][2] == TEXT
        assert len(srv.connections) <= 10
        # The oldest tricklers were dropped to make room; the newest are still open.
        tricklers[0].settimeout(5)
        assert tricklers[0].recv(1024) == b""
        tricklers[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            tricklers[-1].recv(1024)
        # One line, not one per connection.
        lines = [r for r in caplog.records if r.getMessage() == "connection cap reached"]
        assert len(lines) == 1
    finally:
        for sock in tricklers:
            sock.close()
        srv.stop()


def test_the_connection_cap_stays_below_the_file_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    assert connection_cap(HttpLimits()) == 256 - FD_RESERVE
    assert connection_cap(HttpLimits(max_connections=50)) == 50
    monkeypatch.setattr(resource, "getrlimit", lambda _: (40, 4096))
    assert connection_cap(HttpLimits()) == 8


def test_a_client_still_sending_after_its_answer_reads_it(server: MetricsServer) -> None:
    """Closing a connection with unread input makes the kernel reset it, which can destroy the
    answer before the client reads it: a head over the limit, with more after it, gets its
    431 once the client has sent everything and stops (the server reads and drops the rest)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (2 << 20))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    responses = _responses(b"".join(chunks))
    assert [r[0] for r in responses] == [431]
