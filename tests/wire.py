"""The client's side of the /metrics server's tests (tests/test_http.py, tests/test_security.py):
a source serving a text, the request for it, the wait for connections that stopped reading,
and answers read off a socket by hand, a byte at a time up to the body."""

from __future__ import annotations

import gzip
import socket
import time
from types import SimpleNamespace

from exporter.server import MetricsServer
from exporter.snapshot import Snapshot

HUGE = b"# many series\n" * 1_200_000
"""16.8 MB: several times what the kernel's buffers take of an answer on loopback while the
client does not read (about 4 MB: the sender's buffer grows to 4 MB, the receiver's stays
at its default)."""


ASK_FOR_TEXT = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
"""A keep-alive request for the text, uncompressed (no Accept-Encoding)."""


def serving(text: bytes) -> SimpleNamespace:
    """What a server reads its snapshot from, serving ``text``."""
    return SimpleNamespace(snapshot=Snapshot((), gzip.compress(text, mtime=0)))


def wait_until_paused(server: MetricsServer, count: int) -> None:
    """Wait (10 s at most) until the server has ``count`` connections, each paused: its client
    does not read what it was sent."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        len(server.connections) == count and all(c.paused for c in list(server.connections))
    ):
        time.sleep(0.05)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, however many reads they take."""
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        assert chunk, "closed early"
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_head(sock: socket.socket) -> bytes:
    """A response's status line and headers, read a byte at a time: nothing of what follows."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, "closed early"
        head += byte
    return head


def read_response(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """A 200 response framed by its Content-Length: its headers and its body."""
    lines = read_head(sock).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    assert lines[0].split(" ")[1] == "200"
    return headers, read_exactly(sock, int(headers["content-length"]))
