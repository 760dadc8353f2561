"""Run the sources' queries and publish a new snapshot; scrapes never touch the database.

One refresh is one REPEATABLE READ, READ ONLY transaction, so every family describes the same
instant of the ledger. Each query runs under its own savepoint: one failing query keeps its
source's last good state and does not stop the others. What a query computes is its source's
business (exporter/sources/); the refresher only runs them and keeps their health.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Any, Self, TypeVar, cast

import psycopg
from prometheus_client.metrics_core import Metric as Family
from psycopg.rows import namedtuple_row

from exporter.config import Settings
from exporter.contract import check_relations
from exporter.exposition import TextRenderer
from exporter.families import LedgerFamilies, Samples
from exporter.health import Health, QueryHealth
from exporter.incremental import Plan, Watermark
from exporter.labels import ProviderFamilies
from exporter.logs import error_fields, event
from exporter.queries import SEED, SNAPSHOT, Columns, snapshot_params
from exporter.snapshot import Snapshot
from exporter.sources import Instants, Refresh, Source, Statement, build_ledger, sources

log = logging.getLogger(__name__)
S = TypeVar("S", bound=Source)

SEED_WAIT_SECONDS = 0.1
"""How long an exporter's first refresh may wait for the transactions that were running when
it seeded its watermark; past that (a long transaction) it reads as if unseeded."""


class TimedCursor(psycopg.Cursor[Any]):
    """A cursor that counts the time spent waiting for PostgreSQL: in ``execute`` (which
    returns once the whole result is in) and while streaming rows. Building Python rows from
    a result (``fetchall``) is the exporter's own time."""

    waited = 0.0

    def execute(self, *args: Any, **kwargs: Any) -> Self:
        started = time.perf_counter()
        try:
            return super().execute(*args, **kwargs)
        finally:
            self.waited += time.perf_counter() - started

    def stream(self, *args: Any, **kwargs: Any) -> Generator[Any, None, None]:
        """Rows as ``Cursor.stream`` yields them; closing this closes that stream at once."""
        stream = cast(Generator[Any, None, None], super().stream(*args, **kwargs))
        with contextlib.closing(stream) as rows:
            while True:
                started = time.perf_counter()
                try:
                    row = next(rows)
                except StopIteration:
                    return
                finally:
                    self.waited += time.perf_counter() - started
                yield row


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """Open a read-only session with the exporter's timeouts."""
    conn = psycopg.connect(
        settings.dsn_value(),
        connect_timeout=settings.connect_timeout_seconds,
        fallback_application_name="resource-exporter",
        # Text as UTF-8 whatever the database's encoding; a SQL_ASCII one sends its bytes as
        # they are, which psycopg would otherwise hand over as bytes, not str.
        client_encoding="UTF8",
        cursor_factory=TimedCursor,
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
            [_milliseconds(settings.statement_timeout_seconds), f"{settings.work_mem_mb}MB"],
        )
        conn.commit()
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    except BaseException:
        conn.close()
        raise
    return conn


def _milliseconds(seconds: float) -> str:
    """A timeout as PostgreSQL reads it: at least 1 ms (0 would be no timeout at all)."""
    return f"{max(1, round(seconds * 1000))}ms"


def _timeout(cur: psycopg.Cursor[Any], seconds: float) -> None:
    """Set ``statement_timeout`` for the rest of the transaction (undone if its savepoint
    rolls back)."""
    cur.execute("SELECT set_config('statement_timeout', %s, true)", [_milliseconds(seconds)])


class Refresher:
    """Owns the database session, the sources and their health, and the current snapshot."""

    def __init__(self, settings: Settings, clock: Any = time.time) -> None:
        self.settings = settings
        self.providers = ProviderFamilies(settings.providers)
        self.sources = sources(settings, self.providers)
        self._by_query = {query: s for s in self.sources for query in s.queries}
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._running = threading.Lock()
        self._closing = threading.Event()
        self._outage = 0  # consecutive refreshes that could not reach the database
        self.watermark = Watermark(settings.reconcile_interval_seconds)
        self._plan: Plan | None = None
        self._columns = Columns()  # the optional cost_ledger columns of the last refresh
        self.health = Health(
            interval=settings.interval_seconds,
            window=settings.window_days * 86400.0,
            grace=settings.grace_hours * 3600.0,
            queries={query: QueryHealth() for query in self._by_query},
            started=clock(),
        )
        self._renderer = TextRenderer()
        self._samples = Samples()  # the ledger families' samples as last built
        self.snapshot = Snapshot.of(self.health.families(), fresh_until=-math.inf)

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

    def source(self, kind: type[S]) -> S:
        """The refresher's source of that kind (for backfill, bench and tests)."""
        return next(s for s in self.sources if isinstance(s, kind))

    @property
    def columns(self) -> Columns:
        """The optional cost_ledger columns the last refresh found."""
        return self._columns

    @property
    def ledger(self) -> LedgerFamilies:
        """The ledger families of the published snapshot, and how their labels were guarded."""
        return self.health.ledger

    def _refresh(self, now: datetime) -> bool:
        started = time.perf_counter()
        instants = Instants.at(now, self.settings)
        ok = self._run_all(instants)
        h = self.health
        h.refreshes += 1
        h.refresh_duration = time.perf_counter() - started
        h.last_refresh = self._clock()
        ok &= self._build()
        h.failures += 0 if ok else 1
        if ok:
            h.last_success = h.last_refresh
        fresh_until = (
            -math.inf
            if h.last_success is None
            else h.last_success + self.settings.max_staleness_seconds
        )
        started = time.perf_counter()
        families = h.ledger.families + h.families()
        snapshot = self._render(families, fresh_until)
        h.render_seconds = time.perf_counter() - started
        if snapshot is None:  # the last snapshot is served on, until it is stale
            if ok:  # else counted above already
                h.failures += 1
            return False
        self.snapshot = snapshot
        return ok

    def _build(self) -> bool:
        """Build the ledger families from the sources' state; False if that failed.

        The rows folded, so a failure here is a bug (a float token column once was one): the
        refresh fails with one line, logged as sparsely as a failing query, and the last
        families built are published again, next to this refresh's health, until they are
        older than ``max_staleness_seconds``: then none, as for a query failing that long.
        """
        h = self.health
        try:
            ledger = build_ledger(self._ready(), self.settings, self.providers, self._samples)
        except Exception as exc:
            h.build_failing += 1
            _log_failure("families not built", h.build_failing, exc)
            built = h.last_success  # the last refresh that built its families
            if built is None or built < self._stale_before():
                h.ledger = LedgerFamilies()
            return False
        h.build_failing = _log_recovery("families built again", h.build_failing)
        h.ledger, h.build_seconds = ledger, ledger.build_seconds
        return True

    def _render(self, families: list[Family], fresh_until: float) -> Snapshot | None:
        """Render with the refresher's renderer, which reuses its last rendering; should it
        fail (a bug), with prometheus-client's own, and start the next one afresh. None if
        that fails too (a value neither can write): the refresh fails with one line."""
        h = self.health
        try:
            openmetrics = self.snapshot.served_openmetrics  # then asked of this one too
            snapshot = Snapshot.of(families, fresh_until, self._renderer, openmetrics)
        except Exception as exc:
            h.render_failing += 1
            self._renderer = TextRenderer()
            try:
                fallback = Snapshot.of(families, fresh_until)
            except Exception as again:
                _log_failure("not rendered, the last exposition kept", h.render_failing, again)
                return None
            _log_failure("rendered by prometheus-client", h.render_failing, exc)
            return fallback
        h.render_failing = _log_recovery("rendered again", h.render_failing)
        return snapshot

    def _ready(self) -> list[Source]:
        """The sources whose data is fresh enough to publish.

        A query that has not succeeded within the maximum staleness leaves its source's
        families out, so they disappear (a gap in Grafana) instead of showing a flat line of
        old numbers; the health families say why.
        """
        limit = self._stale_before()
        fresh = frozenset(
            name
            for name, health in self.health.queries.items()
            if (health.last_success or 0.0) >= limit
        )
        return [s for s in self.sources if s.ready(fresh)]

    def _stale_before(self) -> float:
        """Data last read (or built) before this Unix time is too old to publish."""
        return float(self._clock()) - self.settings.max_staleness_seconds

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
            if self.watermark.unseeded:
                self._seed(conn)
            with conn.transaction():
                (snap,) = conn.execute(SNAPSHOT.sql, snapshot_params()).fetchall()
                columns = Columns(frozenset(snap.columns), frozenset(snap.integer_columns))
                if columns != self._columns:
                    # Rows already folded were read without (or with) these columns.
                    self.watermark.last_full = None
                self._plan = self.watermark.plan(int(snap.xmin), int(snap.xmax), self._clock())
                self._columns = columns
                refresh = Refresh(instants, self._plan, self.watermark, self._clock(), columns)
                for query, source in self._by_query.items():
                    if self._closing.is_set():  # shutting down: start no further query
                        return False
                    ok &= self._run(conn, source, query, refresh)
        except psycopg.Error as exc:
            if not conn.broken:
                raise
            # The connection itself broke: every query not yet recorded failed with it.
            self._drop_connection()
            self._fail_all(exc)
            return False
        return ok

    def _seed(self, conn: psycopg.Connection[Any]) -> None:
        """Seed the watermark in a transaction before the first refresh's (``SEED``), then
        wait up to ``SEED_WAIT_SECONDS`` for the transactions running at its snapshot to end
        (appends take milliseconds), so that the first refresh can take the seed. A failure
        here (no ledger yet) leaves it unseeded: the refresh reports what is wrong."""
        try:
            with conn.transaction():
                (seed,) = conn.execute(SEED.sql).fetchall()
            if seed.largest is None:
                return
            self.watermark.seed(int(seed.xmax), int(seed.largest))
            deadline = time.monotonic() + SEED_WAIT_SECONDS
            while time.monotonic() < deadline:
                with conn.transaction():
                    (snap,) = conn.execute(SNAPSHOT.sql, snapshot_params(columns=False)).fetchall()
                if snap.xmin >= seed.xmax:
                    return
                time.sleep(0.01)
        except psycopg.Error:
            if conn.broken:
                raise

    def _run(
        self, conn: psycopg.Connection[Any], source: Source, query: str, refresh: Refresh
    ) -> bool:
        health = self.health.queries[query]
        started = time.perf_counter()
        try:
            with conn.transaction(), conn.cursor() as cur:
                # A rebuild reads the whole ledger or window: it gets a timeout of its own.
                rebuild = source.rebuilds(query, refresh)
                if rebuild:
                    _timeout(cur, self.settings.rebuild_timeout_seconds)
                try:
                    source.read(query, cur, refresh)
                finally:
                    health.database = cur.waited if isinstance(cur, TimedCursor) else 0.0
                if rebuild:
                    _timeout(cur, self.settings.statement_timeout_seconds)
        except psycopg.Error as exc:
            health.duration = time.perf_counter() - started
            if conn.broken:
                raise
            if self._closing.is_set():
                health.errors += 1
                health.failing += 1
                event(log, logging.INFO, "query cancelled by shutdown", query=query)
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
        health.failing = _log_recovery("query recovered", health.failing, query=query)
        return True

    def _failed(self, query: str, message: str, exc: Exception, **fields: Any) -> None:
        """Count a failed query; log it on the first failure and then sparsely."""
        health = self.health.queries[query]
        health.errors += 1
        health.failing += 1
        _log_failure(message, health.failing, exc, query=query, **fields)

    def statement(self, query: str, instants: Instants) -> Statement:
        """The SQL and bind parameters of ``query`` in the next refresh (for bench/ and tests).

        Planned as the last refresh was; call it after at least one refresh.
        """
        if self._plan is None:
            raise RuntimeError("no refresh has run yet")
        refresh = Refresh(instants, self._plan, self.watermark, self._clock(), self._columns)
        return self._by_query[query].statement(query, refresh)

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
        if _log_now(self._outage) and not self._closing.is_set():  # not after "stopped"
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


def _log_failure(
    message: str, failures: int, exc: BaseException, query: str | None = None, **fields: Any
) -> None:
    """Log the ``failures``-th consecutive failure of one kind (of ``query``), if ``_log_now``
    says so: ``query=``, ``failures=``, the error, then ``fields``."""
    if _log_now(failures):
        about = {} if query is None else {"query": query}
        error = error_fields(exc)
        event(log, logging.ERROR, message, **about, failures=failures, **error, **fields)


def _log_recovery(message: str, failures: int, query: str | None = None) -> int:
    """Log that a kind of failure (of ``query``) ended after ``failures`` in a row, if any;
    return the count it starts again from (0)."""
    if failures:
        about = {} if query is None else {"query": query}
        event(log, logging.INFO, message, **about, failures=failures)
    return 0


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
