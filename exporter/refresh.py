"""Run the ledger queries and publish a new snapshot; scrapes never touch the database.

One refresh is one REPEATABLE READ, READ ONLY transaction, so every family describes the same
instant of the ledger. Each query runs under its own savepoint: one failing query keeps its last
good rows and does not stop the others.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row

from exporter import queries as q
from exporter.config import Settings
from exporter.contract import check_relations
from exporter.families import build_ledger
from exporter.health import Health, QueryHealth
from exporter.incremental import Plan, SpendTotals, merge
from exporter.labels import ProviderFamilies
from exporter.logs import error_fields, event
from exporter.snapshot import Snapshot
from exporter.window import WindowTasks, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instants:
    """The boundaries one refresh computes its windows from."""

    now: datetime
    today: date
    today_start: datetime
    window_start: datetime
    grace_cutoff: datetime

    @classmethod
    def at(cls, now: datetime, settings: Settings) -> Instants:
        local = now.astimezone(settings.zone)
        midnight = datetime.combine(local.date(), datetime.min.time(), settings.zone)
        return cls(
            now=now,
            today=local.date(),
            today_start=midnight.astimezone(UTC),
            window_start=now - timedelta(days=settings.window_days),
            grace_cutoff=now - timedelta(hours=settings.grace_hours),
        )


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """Open a read-only session with the exporter's timeouts."""
    conn = psycopg.connect(
        settings.dsn_value(),
        connect_timeout=settings.connect_timeout_seconds,
        fallback_application_name="resource-exporter",
        row_factory=namedtuple_row,
        # Plan every statement with its parameters: a generic plan of "id > $1" cannot tell the
        # rows after a watermark (an index range) from the whole ledger (a scan).
        prepare_threshold=None,
    )
    try:
        conn.execute(
            "SELECT set_config('default_transaction_read_only', 'on', false) AS read_only,"
            " set_config('statement_timeout', %s, false) AS statement_timeout,"
            " set_config('TimeZone', 'UTC', false) AS timezone,"
            " set_config('work_mem', %s, false) AS work_mem",
            [f"{int(settings.statement_timeout_seconds * 1000)}ms", f"{settings.work_mem_mb}MB"],
        )
        conn.commit()
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    except BaseException:
        conn.close()
        raise
    return conn


class Refresher:
    """Owns the database session, the last good rows per query, and the current snapshot."""

    def __init__(self, settings: Settings, clock: Any = time.time) -> None:
        self.settings = settings
        self.providers = ProviderFamilies(settings.providers)
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._running = threading.Lock()
        self._closing = threading.Event()
        self._outage = 0  # consecutive refreshes that could not reach the database
        self._spend = SpendTotals(settings.reconcile_interval_seconds)
        self._window = WindowTasks()
        self._plan: Plan | None = None
        self._recent: list[Any] | None = None
        self._rows: dict[str, list[Any]] = {}
        self.health = Health(
            interval=settings.interval_seconds,
            queries={query.name: QueryHealth() for query in q.ALL_QUERIES},
            started=clock(),
        )
        self.snapshot = Snapshot.of(self.health.families())

    def refresh(self, now: datetime | None = None) -> bool:
        """Run every query once and publish a snapshot; return True if all succeeded.

        A call made while another refresh runs returns False at once and is counted as skipped.
        """
        if not self._running.acquire(blocking=False):
            self.health.skipped += 1
            event(log, logging.WARNING, "refresh skipped: the previous refresh is still running")
            return False
        try:
            return self._refresh(now or datetime.fromtimestamp(self._clock(), UTC))
        finally:
            self._running.release()

    @property
    def rows(self) -> Mapping[str, list[Any]]:
        """The latest good rows of each query (what the published families were built from)."""
        return MappingProxyType(self._rows)

    def _refresh(self, now: datetime) -> bool:
        started = time.perf_counter()
        instants = Instants.at(now, self.settings)
        ok = self._run_all(instants)
        h = self.health
        h.refreshes += 1
        h.failures += 0 if ok else 1
        h.refresh_duration = time.perf_counter() - started
        h.last_refresh = self._clock()
        if ok:
            h.last_success = h.last_refresh
        h.ledger = build_ledger(self._fresh_rows(), self.settings, self.providers)
        self.snapshot = Snapshot.of(h.ledger.families + h.families())
        return ok

    def _fresh_rows(self) -> dict[str, list[Any]]:
        """The rows of queries that succeeded within the maximum staleness.

        Older ones are left out, so their families disappear (a gap in Grafana) instead of
        showing a flat line of old numbers; the health families say why.
        """
        limit = self._clock() - self.settings.max_staleness_seconds
        return {
            name: rows
            for name, rows in self._rows.items()
            if (self.health.queries[name].last_success or 0.0) >= limit
        }

    def _run_all(self, instants: Instants) -> bool:
        for health in self.health.queries.values():
            health.success = False
        try:
            conn = self._connection()
        except (psycopg.Error, OSError) as exc:
            self._fail_all(exc)
            return False
        ok = True
        try:
            with conn.transaction():
                snap = conn.execute(q.SNAPSHOT.sql).fetchone()
                self._plan = self._spend.plan(int(snap.xmin), int(snap.xmax), self._clock())
                for query in q.ALL_QUERIES:
                    if self._closing.is_set():  # shutting down: start no further query
                        return False
                    ok &= self._run(conn, query, instants)
        except psycopg.Error as exc:
            if not conn.broken:
                raise
            # The connection itself broke: every query not yet recorded failed with it.
            self._drop_connection()
            self._fail_all(exc)
            return False
        return ok

    def _run(self, conn: psycopg.Connection[Any], query: q.Query, instants: Instants) -> bool:
        health = self.health.queries[query.name]
        started = time.perf_counter()
        try:
            with conn.transaction(), conn.cursor() as cur:
                rows = self._read(cur, query, instants)
            self._store(query, rows)
        except psycopg.Error as exc:
            health.duration = time.perf_counter() - started
            if conn.broken:
                raise
            if self._closing.is_set():
                health.errors += 1
                health.failing += 1
                event(log, logging.INFO, "query cancelled by shutdown", query=query.name)
            else:
                self._failed(query, "query failed", exc, **_contract(conn, exc))
            return False
        except Exception as exc:  # rows the exporter cannot use (a bug): keep the last good ones
            health.duration = time.perf_counter() - started
            self._failed(query, "query result not usable", exc)
            return False
        health.duration = time.perf_counter() - started
        health.success = True
        health.last_success = self._clock()
        if health.failing:
            event(log, logging.INFO, "query recovered", query=query.name, failures=health.failing)
            health.failing = 0
        return True

    def _failed(self, query: q.Query, message: str, exc: Exception, **fields: Any) -> None:
        """Count a failed query; log it on the first failure and then sparsely."""
        health = self.health.queries[query.name]
        health.errors += 1
        health.failing += 1
        if _log_now(health.failing):
            event(
                log,
                logging.ERROR,
                message,
                query=query.name,
                failures=health.failing,
                **error_fields(exc),
                **fields,
            )

    def _read(self, cur: psycopg.Cursor[Any], query: q.Query, instants: Instants) -> list[Any]:
        sql, params = self.statement(query, instants)
        if query is not q.WINDOW_TASKS:
            cur.execute(sql, params)
            return cur.fetchall()
        # A rebuild returns rows for every task of the window: they are folded into the
        # per-task sums as they arrive instead of being held all at once.
        tasks, impacts = self._window.apply(
            self._plan, cur.stream(sql, params, size=2000), instants.window_start, self.providers
        )
        return summarize(tasks, impacts, self.settings, instants.grace_cutoff)

    def statement(self, query: q.Query, instants: Instants) -> tuple[str, dict[str, Any]]:
        """The SQL and bind parameters of ``query`` in the current refresh (also for bench/)."""
        params: dict[str, Any] = {
            "today": instants.today,
            "today_start": instants.today_start,
            "window_start": instants.window_start,
        }
        if query is q.SPEND_TOTALS:
            params |= {"after": self._plan.after, "safe": self._plan.safe}
        elif query is q.WINDOW_TASKS:
            full, safe = self._window.bounds(self._plan)
            params |= {"after": self._window.frozen_id, "safe": safe}
            if not full:
                params["tracked"] = self._window.tracked()
                return q.WINDOW_TASKS_STEADY.sql, params
        return query.sql, params

    def _store(self, query: q.Query, rows: list[Any]) -> None:
        """Keep a query's rows; the two spend queries combine into the spend_totals rows."""
        if query is q.SPEND_TOTALS:
            self._spend.apply(self._plan, rows, self._clock())
        elif query is q.SPEND_RECENT:
            self._recent = rows
        else:
            self._rows[query.name] = rows
            return
        if self._recent is not None and self._spend.last_full is not None:
            self._rows[q.SPEND_TOTALS.name] = merge(self._spend.totals, self._recent)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings)
            if self._outage:
                event(log, logging.INFO, "database available again", attempts=self._outage)
        self._outage = 0
        self.health.database_up = True
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _fail_all(self, exc: BaseException) -> None:
        """Count a failure for every query that has not succeeded in this refresh."""
        self.health.database_up = False
        self._outage += 1
        if _log_now(self._outage):
            event(
                log,
                logging.ERROR,
                "database unavailable",
                attempts=self._outage,
                **error_fields(exc),
            )
        for health in self.health.queries.values():
            if not health.success:
                health.errors += 1

    def close(self) -> None:
        """Cancel a running query and close the session (used on shutdown)."""
        self._closing.set()
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=1.0)
        if self._running.acquire(timeout=5):
            try:
                self._drop_connection()
            finally:
                self._running.release()


def _log_now(failures: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th... consecutive failure: a clear line, not a flood."""
    return failures & (failures - 1) == 0


def _contract(conn: psycopg.Connection[Any], exc: psycopg.Error) -> dict[str, str]:
    """Name the relation and column a user's view lacks, when that is why a query failed."""
    if not isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return {}
    try:
        problems = check_relations(conn)
    except psycopg.Error:
        return {}
    return {"contract": "; ".join(problems)} if problems else {}
