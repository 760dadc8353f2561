"""Serve ``/metrics`` from a process of its own, forked at start and fed each snapshot's bytes.

In one process, a scrape waits for the GIL at each system call of its response while a refresh
runs Python: the refresh's thread keeps the GIL until the switch interval (1 ms) makes it let
go, at each call (the convoy effect). Through rebuilds at 10 M rows in the window, 50 scrapers
saw p99 30 to 38 ms served from a thread, 8 to 10 ms from a process of its own, which answered
more (docs/operations.md). Forked before any thread starts, the server shares the parent's
libraries and modules at first; but a page either process writes becomes that process' own
copy, and a refresh writes to many of the parent's (reference counts, allocations), so within
a few refreshes the server holds about 14 MiB the parent no longer shares. Hence a setting
(``server_process``), off by default.

The parent sends every new snapshot's gzipped text and OpenMetrics and its freshness over a
socket pair; the child serves the last one it received. Either end going away ends the other:
the child exits when the socket closes (the parent stopped or died), and the parent stops with
one line when the child has exited (``Exporter.run_until_signal``): a supervisor restarts
both, as it would a crashed exporter.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import signal
import socket
import struct
import threading
import time
from typing import BinaryIO, NamedTuple, NoReturn

from exporter.config import Settings
from exporter.logs import event
from exporter.server import MetricsServer
from exporter.snapshot import Snapshot

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")  # each message: its length, then its pickle
REPORT_TIMEOUT_SECONDS = 60.0
"""How long the parent waits for the child to say it serves (the web config's bcrypt and TLS
files are loaded before)."""
SEND_TIMEOUT_SECONDS = 10.0
"""A server process that has not taken a snapshot in this long is stuck: it is stopped."""
STOP_TIMEOUT_SECONDS = 5.0


def can_fork() -> bool:
    """Whether a server process can be forked safely here: a platform with ``fork``, and no
    other thread running (a fork copies only the calling thread, and a lock another thread
    held stays locked in the child)."""
    return hasattr(os, "fork") and threading.active_count() == 1


class ServerProcess:
    """The parent's handle on the server process: what ``MetricsServer`` offers the exporter,
    and ``publish``."""

    def __init__(self, settings: Settings, snapshot: Snapshot) -> None:
        """Fork the server, which binds and loads the web config as ``MetricsServer`` does;
        raise what that raised (``OSError``: the address; ``ConfigError``: the web config)."""
        parent, child = socket.socketpair()
        # Every object so far (modules, the settings, the price catalogue: they live as long
        # as the process) is left out of the cyclic collector's passes, in both processes and
        # for good: a pass writes to every object it visits, and each page the parent writes
        # stops being shared. The server held 14.5 MiB of its own instead of 25.0 at 10 M rows
        # (docs/operations.md); the cost, an object of these that becomes cyclic garbage later
        # is never collected.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            parent.close()
            _serve(child, settings, snapshot)
        child.close()
        self.pid = pid
        self._conn = parent
        self._sent: Snapshot | None = snapshot
        self._status: int | None = None
        self._lock = threading.Lock()
        try:
            parent.settimeout(REPORT_TIMEOUT_SECONDS)
            with parent.makefile("rb") as stream:
                report = _receive(stream)
            parent.settimeout(SEND_TIMEOUT_SECONDS)
        except OSError as exc:
            report = _Report(error=RuntimeError(f"the server process did not report: {exc}"))
        if not isinstance(report, _Report):  # none, or cut short: the child died
            report = _Report(error=RuntimeError("the server process exited before serving"))
        if report.error is not None:
            self.stop()
            raise report.error
        self.port, self.tls = report.port, report.tls

    def start(self) -> ServerProcess:
        """Serving already (since the fork): nothing to start."""
        return self

    def publish(self, snapshot: Snapshot) -> None:
        """Send ``snapshot`` to the server if it is new. OpenMetrics is made here, whether or
        not a scrape has asked for it: the server cannot make it from bytes."""
        with self._lock:
            if snapshot is self._sent or self._conn.fileno() < 0:
                return
            self._sent = snapshot
            exposition = _Exposition(
                snapshot.text_gzip, snapshot.openmetrics_gzip, snapshot.fresh_until
            )
            try:
                _send(self._conn, exposition)
            except OSError as exc:
                # Gone, or not reading for SEND_TIMEOUT_SECONDS: a part may have been sent, so
                # the stream is closed (which ends the process); run_until_signal says so.
                event(log, logging.ERROR, "snapshot not sent to the server", error=repr(exc))
                self._conn.close()

    def reload_soon(self) -> None:
        """Have the server read its web config again (SIGHUP, forwarded)."""
        if self.exit_status() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGHUP)

    def running(self) -> bool:
        """Whether the server process serves the snapshots sent (False once it exited, or
        once a snapshot could not be sent)."""
        return self._conn.fileno() >= 0 and self.exit_status() is None

    def exit_status(self) -> int | None:
        """The server process' exit code (a signal's: minus its number), None while it runs."""
        if self._status is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return None
                self._status = os.waitstatus_to_exitcode(status)
            if self._status is None:  # reaped elsewhere
                self._status = -1
        return self._status

    def stop(self) -> None:
        """Close the socket, which ends the server process; kill it if it has not ended soon."""
        with self._lock:
            self._conn.close()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while self.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.exit_status() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self._status = -signal.SIGKILL


class _Report(NamedTuple):
    """What the child says once: where it serves, or why it cannot."""

    port: int = 0
    tls: bool = False
    error: BaseException | None = None


class _Exposition(NamedTuple):
    """What the parent sends of each snapshot (``Snapshot.received``'s arguments)."""

    text_gzip: bytes
    openmetrics_gzip: bytes
    fresh_until: float


class _Received:
    """The server's source in the child: the last snapshot received."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot


def _serve(conn: socket.socket, settings: Settings, snapshot: Snapshot) -> NoReturn:
    """The child: serve until the parent closes the socket, then exit (never return into the
    parent's code, whatever happens)."""
    code = 1
    try:
        # Ctrl-C reaches the whole process group: the parent stops, and then this process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        source = _Received(snapshot)  # the refresher's first (health only, until a refresh)
        try:
            server = MetricsServer(
                source, settings.listen, settings.port, settings.web_config_file, settings.http
            )
        except Exception as exc:  # the address, the web config: the parent raises it
            _send(conn, _Report(error=exc))
            _exit(0)
        signal.signal(signal.SIGHUP, lambda *_: server.reload_soon())
        server.start()
        _send(conn, _Report(server.port, server.tls))
        received = conn.makefile("rb")
        while isinstance(sent := _receive(received), _Exposition):  # None: the socket closed
            source.snapshot = Snapshot.received(*sent)
        server.stop()
        code = 0
    except BaseException as exc:  # a bug: one line, and the parent notices the exit
        event(log, logging.ERROR, "server process failed", error=repr(exc))
    _exit(code)


def _exit(code: int) -> NoReturn:
    logging.shutdown()
    os._exit(code)


def _send(conn: socket.socket, message: _Report | _Exposition) -> None:
    """One message: its length, then its pickle (a report's error keeps its type: ``OSError``'s
    errno, ``ConfigError``)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.sendall(_LENGTH.pack(len(data)))
    conn.sendall(data)


def _receive(stream: BinaryIO) -> object:
    """The next message (the other process: trusted); None once the socket is closed, or if a
    message was cut short."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    data = stream.read(_LENGTH.unpack(head)[0])
    try:
        return pickle.loads(data)
    except (pickle.UnpicklingError, EOFError):
        return None
