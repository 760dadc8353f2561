"""The long-running exporter: a scheduler that refreshes, and a server that serves."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from types import FrameType

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from exporter.config import Settings
from exporter.logs import event
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from exporter.serverprocess import ServerProcess, can_fork

log = logging.getLogger(__name__)

SWITCH_INTERVAL_SECONDS = 0.0001
"""How long a refresh may keep the GIL from a scrape that waits for it (Python's default is
5 ms). The server's thread gives the GIL up at each system call of a response and waits up to
that long to take it back while a refresh runs Python. 50 connections through rebuilds at
10 M rows: p99 33-35 ms at 1 ms, 12-15 ms at 0.1 ms, 13 ms at 0.05 ms (the rest is the cores
PostgreSQL shares); 212-217 ms at 5 ms in an earlier run (docs/operations.md). The price:
under that load a rebuild took about 15 % longer, the scrapes having the GIL sooner. With no
scrape waiting nothing interrupts a refresh: a rebuild 14.0 s at 1 ms, 14.1 s at 0.1 ms."""


class Exporter:
    """Refresh on an interval (never overlapping) and serve the latest snapshot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refresher = Refresher(settings)
        self.server = _server(settings, self.refresher)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.scheduler.add_job(
            self._refresh,
            "interval",
            seconds=settings.interval_seconds,
            id="refresh",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)
        self._stopped = threading.Event()

    def _refresh(self) -> None:
        self.refresher.refresh()
        self.server.publish(self.refresher.snapshot)

    def _skipped(self, _: JobExecutionEvent) -> None:
        self.refresher.health.skipped += 1

    def start(self) -> Exporter:
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        self.server.start()
        self.scheduler.start()
        event(
            log,
            logging.INFO,
            "serving",
            listen=self.settings.listen,
            port=self.server.port,
            tls=self.server.tls,
            interval_seconds=self.settings.interval_seconds,
            server_process=isinstance(self.server, ServerProcess),
        )
        return self

    def stop(self) -> None:
        """Stop scheduling, cancel a running query, close the session and the server."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scheduler.shutdown(wait=False)
        self.refresher.close()
        self.server.stop()
        event(log, logging.INFO, "stopped")

    def run_until_signal(self) -> int:
        """Block until SIGINT or SIGTERM, then stop cleanly (0); or until the server process
        has exited, then stop with one line (1).

        Python runs a signal's handler in the main thread, between two of its bytecodes. The
        kernel may deliver the signal to another thread (the server's, the scheduler's), which
        does not wake a main thread blocked without a timeout: so it wakes every 0.1 s. The
        handlers only note the signal; what it asks for is done outside them.
        """
        received: list[signal.Signals] = []

        def handler(signum: int, _: FrameType | None) -> None:
            received.append(signal.Signals(signum))

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        # SIGHUP: read the web config again now (changes are also noticed within seconds).
        signal.signal(signal.SIGHUP, lambda *_: self.server.reload_soon())
        self.start()
        try:
            while not received and self.server.running():
                time.sleep(0.1)
            if not received:
                code = self.server.exit_status()
                event(log, logging.ERROR, "the server stopped serving", exit_code=code)
                return 1
            event(log, logging.INFO, "signal received", signal=received[0].name)
            return 0
        finally:
            self.stop()


def _server(settings: Settings, refresher: Refresher) -> MetricsServer | ServerProcess:
    """The server: in a process of its own if the settings ask for it and a fork is safe
    here, else in a thread of this one (with a line saying why, if they asked)."""
    if settings.server_process:
        if can_fork():
            return ServerProcess(settings, refresher.snapshot)
        event(log, logging.WARNING, "serving from a thread: other threads run, a fork is unsafe")
    return MetricsServer(
        refresher, settings.listen, settings.port, settings.web_config_file, settings.http
    )
