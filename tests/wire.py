"""HTTP answers read off a socket by hand, a byte at a time up to the body: for the tests of
what the /metrics server writes and when (tests/test_http.py, tests/test_security.py)."""

from __future__ import annotations

import socket

HUGE = b"# many series\n" * 1_200_000
"""16.8 MB: several times what the kernel's buffers take of an answer on loopback while the
client does not read (about 4 MB: the sender's buffer grows to 4 MB, the receiver's stays
at its default)."""


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
