"""The long-running exporter: a scheduler that refreshes, and a server that serves."""

from __future__ import annotations

import logging
import signal
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

log = logging.getLogger(__name__)


class Exporter:
    """Refresh on an interval (never overlapping) and serve the latest snapshot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refresher = Refresher(settings)
        self.server = MetricsServer(
            self.refresher,
            settings.listen,
            settings.port,
            settings.web_config_file,
            limits=settings.http,
        )
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.scheduler.add_job(
            self.refresher.refresh,
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

    def _skipped(self, _: JobExecutionEvent) -> None:
        self.refresher.health.skipped += 1

    def start(self) -> Exporter:
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

    def run_until_signal(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly.

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
            while not received:
                time.sleep(0.1)
            event(log, logging.INFO, "signal received", signal=received[0].name)
        finally:
            self.stop()
