"""Database faults, each against a real PostgreSQL: down, lost, slow, and a broken view."""

from __future__ import annotations

import gzip
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest

from exporter import snapshot as snapshot_module
from exporter import tasks as tasks_module
from exporter.config import load_settings
from exporter.exposition import Families, TextRenderer
from exporter.refresh import Refresher
from exporter.service import Exporter
from exporter.sources import WindowSource
from exporter.sources import spend as spend_source
from tests.conftest import StoppableServer
from tests.ledger import Call, Impact, insert, key, parse

NOW = datetime.now(UTC)
SPEND_COUNTER = "scidex_spend_usd_total"
SPEND = key(SPEND_COUNTER, quest="q-a", layer="Forge", provider="bedrock")


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _ledger(dsn: str) -> None:
    insert(dsn, [Call(NOW - timedelta(hours=1), "t1", cost_usd=Decimal("4"))], [Impact("t1", 2.0)])


def _log_lines(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    """The fields of each line logged with ``message`` (``exporter.logs.event``'s)."""
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == message]


def test_database_down_at_start_then_up_within_one_interval(
    own_server: StoppableServer, caplog: pytest.LogCaptureFixture
) -> None:
    _ledger(own_server.dsn)
    own_server.stop()
    interval = 0.5
    settings = load_settings(
        {"dsn": own_server.dsn, "interval_seconds": interval, "port": 0, "listen": "127.0.0.1"},
        env={},
    )
    caplog.set_level(logging.INFO, logger="exporter")
    exporter = Exporter(settings).start()
    try:
        deadline = time.monotonic() + 10
        while exporter.refresher.health.refreshes < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = exporter.refresher.health
        assert health.refreshes >= 8 and not health.database_up
        samples = parse(exporter.refresher.snapshot.text)
        assert samples[key("scidex_exporter_database_up")] == 0
        assert SPEND not in samples
        # One line per failed attempt, backing off: attempts 1, 2, 4 and 8 for 8-15 attempts.
        attempts = [r["attempts"] for r in _log_lines(caplog, "database unavailable")]
        assert attempts == [1, 2, 4, 8][: len(attempts)] and len(attempts) <= 4
        own_server.start()
        up_at = time.monotonic()
        # Wait for the published snapshot, not for health: the refresher records success
        # a moment before it publishes the snapshot built from it.
        while SPEND not in parse(exporter.refresher.snapshot.text) and (
            time.monotonic() < up_at + 10
        ):
            time.sleep(0.02)
        # The next scheduled attempt succeeds: at most one interval, plus that refresh itself
        # (a first refresh connects and runs every query; slower on a busy machine).
        assert time.monotonic() - up_at <= interval + health.refresh_duration + 0.3
        samples = parse(exporter.refresher.snapshot.text)
        assert samples[SPEND] == 4
        assert _log_lines(caplog, "database available again")
    finally:
        exporter.stop()


def test_connection_killed_keeps_last_values_and_reconnects(dsn: str) -> None:
    _ledger(dsn)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    assert refresher.refresh()
    with psycopg.connect(dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'resource-exporter' AND datname = current_database()"
        ).fetchall()
    assert killed == [(True,)]
    assert refresher.refresh() is False
    samples = parse(refresher.snapshot.text)
    assert samples[SPEND] == 4  # the last good value
    assert samples[key("scidex_exporter_database_up")] == 0
    assert samples[key("scidex_exporter_query_success", query="spend_totals")] == 0
    assert samples[key("scidex_exporter_refresh_failures_total")] == 1
    assert refresher.refresh() is True  # reconnected by itself
    samples = parse(refresher.snapshot.text)
    assert samples[key("scidex_exporter_database_up")] == 1
    refresher.close()


def test_server_stopped_mid_run_serves_old_values_then_a_gap(own_server: StoppableServer) -> None:
    _ledger(own_server.dsn)
    clock = Clock()
    settings = load_settings({"dsn": own_server.dsn, "max_staleness_seconds": 300}, env={})
    refresher = Refresher(settings, clock=clock)
    assert refresher.refresh()
    good_at = clock.now
    own_server.stop()
    clock.now += 120
    assert refresher.refresh() is False
    samples = parse(refresher.snapshot.text)
    assert samples[SPEND] == 4
    assert samples[key("scidex_exporter_last_successful_refresh_timestamp_seconds")] == good_at
    assert samples[key("scidex_exporter_database_up")] == 0
    clock.now += 200  # 320 s since the last success: past the maximum staleness
    assert refresher.refresh() is False
    samples = parse(refresher.snapshot.text)
    assert not [k for k in samples if not k[0].startswith("scidex_exporter_")]
    assert samples[key("scidex_exporter_query_errors_total", query="window_tasks")] == 2
    own_server.start()
    assert refresher.refresh() is True
    assert parse(refresher.snapshot.text)[SPEND] == 4
    refresher.close()


def test_a_hung_query_is_cancelled_and_the_others_refresh(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    _ledger(dsn)
    timeouts = {"statement_timeout_seconds": 0.5, "rebuild_timeout_seconds": 0.5}
    refresher = Refresher(load_settings({"dsn": dsn, **timeouts}, env={}))
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE impact_ledger IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        assert refresher.refresh() is False
        assert time.monotonic() - started < 3
    finally:
        blocker.close()
    refresher.close()
    samples = parse(refresher.snapshot.text)
    assert samples[key("scidex_exporter_query_success", query="window_tasks")] == 0
    assert samples[key("scidex_exporter_query_duration_seconds", query="window_tasks")] >= 0.5
    # It waited on the lock: PostgreSQL's time, not the exporter's.
    waited = samples[key("scidex_exporter_query_database_seconds", query="window_tasks")]
    duration = samples[key("scidex_exporter_query_duration_seconds", query="window_tasks")]
    assert 0.5 <= waited <= duration
    for other in ("spend_totals", "newest_call", "budget_today"):
        assert samples[key("scidex_exporter_query_success", query=other)] == 1
    assert samples[SPEND] == 4
    # The provider families come from the same scan of the window: not there yet either.
    assert key("scidex_provider_spend_usd", provider="bedrock") not in samples
    (line,) = _log_lines(caplog, "query failed")
    assert line["query"] == "window_tasks"
    assert line["error_kind"] == "QueryCanceled"
    assert "statement timeout" in line["error"]


def test_a_rebuild_runs_under_its_own_timeout_and_a_steady_read_under_the_statement_one(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first refresh reads the whole window: it waits for a lock longer than
    statement_timeout_seconds, within rebuild_timeout_seconds; a steady refresh does not."""
    _ledger(dsn)
    timeouts = {"statement_timeout_seconds": 0.5, "rebuild_timeout_seconds": 30}
    refresher = Refresher(load_settings({"dsn": dsn, **timeouts}, env={}))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE impact_ledger IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(1.5, blocker.rollback)
        release.start()
        started = time.monotonic()
        assert refresher.refresh() is True
        assert time.monotonic() - started >= 1.5
        release.join()
        assert refresher.refresh() is True  # the watermark settles: the next one is steady
        assert refresher.source(WindowSource).tasks.frozen_id >= 0
        blocker.execute("LOCK TABLE impact_ledger IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        assert refresher.refresh() is False
        assert time.monotonic() - started < 3
    samples = parse(refresher.snapshot.text)
    assert samples[key("scidex_exporter_query_success", query="window_tasks")] == 0
    (line,) = _log_lines(caplog, "query failed")
    assert line["query"] == "window_tasks"
    assert "statement timeout" in line["error"]
    refresher.close()


def test_a_fold_failing_mid_stream_fails_that_query_and_does_not_hang(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window's rebuild folds rows as they stream in. A stream holds the connection until
    it is closed: a failure (or Ctrl-C) part way must close it, or rolling back waits forever."""
    caplog.set_level(logging.INFO, logger="exporter.refresh")
    _ledger(dsn)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))

    def fail(*_: Any) -> None:
        raise TypeError("unsupported operand")

    monkeypatch.setattr(tasks_module, "_fold", fail)
    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(refresher.refresh()), daemon=True)
    worker.start()
    worker.join(30)
    assert done == [False], "the refresh is stuck behind the stream it left open"
    (line,) = _log_lines(caplog, "query result not usable")
    assert line["query"] == "window_tasks" and line["error_kind"] == "TypeError"
    monkeypatch.undo()
    assert refresher.refresh()  # the same session goes on
    assert parse(refresher.snapshot.text)[SPEND] == 4
    (line,) = _log_lines(caplog, "query recovered")
    assert line["query"] == "window_tasks" and line["failures"] == 1
    refresher.close()


def test_a_view_missing_a_column_is_named_and_the_rest_works(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    _ledger(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE impact_ledger RENAME TO impact_raw")
        conn.execute(
            "CREATE VIEW impact_ledger AS SELECT task_id, title, quest, layer,"
            " measured_at FROM impact_raw"
        )
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    assert refresher.refresh() is False
    refresher.close()
    (line,) = _log_lines(caplog, "query failed")
    assert line["query"] == "window_tasks"
    assert line["error_kind"] == "UndefinedColumn"
    assert line["contract"] == "impact_ledger.impact_score: column is missing"
    samples = parse(refresher.snapshot.text)
    assert samples[SPEND] == 4
    assert samples[key("scidex_exporter_query_success", query="budget_today")] == 1


def test_rows_the_exporter_cannot_use_fail_that_query_and_change_nothing(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processing error (a bug; a float cost once was one) is a failed query, not a crash."""
    _ledger(dsn)
    insert(dsn, [Call(NOW - timedelta(hours=1), "t3", quest=q) for q in ("q-b", "q-c")])
    # Every refresh reads the whole ledger: the second one fails after folding a final row.
    settings = {"dsn": dsn, "reconcile_interval_seconds": 0}
    refresher = Refresher(load_settings(settings, env={}))
    try:
        assert refresher.refresh()
        insert(dsn, [Call(NOW - timedelta(minutes=5), "t2", cost_usd=Decimal("3"))])
        real_add = spend_source.Spans.add
        folded: list[Any] = []

        def add_then_fail(spans: Any, row: Any, sums: Any) -> None:
            if folded:  # fail once a row has been folded into the final sums
                raise TypeError("unsupported operand")
            real_add(spans, row, sums)
            if row.final:
                folded.append(row)

        monkeypatch.setattr(spend_source.Spans, "add", add_then_fail)
        assert refresher.refresh() is False
        (line,) = _log_lines(caplog, "query result not usable")
        assert line["query"] == "spend_totals" and line["error_kind"] == "TypeError"
        samples = parse(refresher.snapshot.text)
        assert samples[SPEND] == 4  # the last good totals, not half of a fold
        assert samples[key("scidex_exporter_query_success", query="spend_totals")] == 0
        assert samples[key("scidex_exporter_query_success", query="window_tasks")] == 1
        monkeypatch.undo()
        assert refresher.refresh()
        spend = {k: v for k, v in parse(refresher.snapshot.text).items() if k[0] == SPEND[0]}
        assert sorted(spend.values()) == [1, 1, 7]  # q-b, q-c and q-a, each counted once
    finally:
        refresher.close()


def test_a_steady_read_that_fails_part_way_keeps_the_recent_sums(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steady read folds its final rows into copies of the running sums and the recent
    spans' sums: failing once one has folded, it keeps the last good spend (the counters and
    this month's), and the next read counts each row once."""
    now = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
    insert(dsn, [Call(now - timedelta(hours=1), "t1", cost_usd=Decimal("4"))])
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    quests = ("q-a", "q-b", "q-c")

    def spend() -> list[tuple[float, float]]:
        """Each quest's spend counter and spend this month."""
        samples = parse(refresher.snapshot.text)
        return [
            (
                samples[key(SPEND_COUNTER, quest=q, layer="Forge", provider="bedrock")],
                samples[key("scidex_quest_spend_month_usd", quest=q)],
            )
            for q in quests
        ]

    try:
        assert refresher.refresh(now)
        calls = [
            Call(now - timedelta(minutes=5), "t2", quest=q, cost_usd=Decimal("3"))
            for q in quests[1:]
        ]
        insert(dsn, calls)
        assert refresher.refresh(now)  # the new rows are its tail, final in the next read
        assert spend() == [(4, 4), (3, 3), (3, 3)]
        real_add = spend_source.Spans.add
        folded: list[Any] = []

        def add_then_fail(spans: Any, row: Any, sums: Any) -> None:
            if folded:
                raise TypeError("unsupported operand")
            real_add(spans, row, sums)
            folded.append(row)

        monkeypatch.setattr(spend_source.Spans, "add", add_then_fail)
        assert refresher.refresh(now) is False
        assert [row.final for row in folded] == [True]  # one of the two had folded
        assert spend() == [(4, 4), (3, 3), (3, 3)]
        monkeypatch.undo()
        assert refresher.refresh(now)
        assert spend() == [(4, 4), (3, 3), (3, 3)]
    finally:
        refresher.close()


def test_families_that_cannot_be_built_fail_the_refresh_and_keep_the_last_ones(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the families from rows that folded is the exporter's own code: a bug there (a
    float token column once was one) fails the refresh with one line, sparsely logged, and
    publishes the last families built with this refresh's health, not a traceback; once they
    are older than the maximum staleness, none (a gap, as for a query failing that long)."""
    caplog.set_level(logging.INFO, logger="exporter.refresh")
    _ledger(dsn)
    clock = [time.time()]
    refresher = Refresher(load_settings({"dsn": dsn}, env={}), clock=lambda: clock[0])
    try:
        assert refresher.refresh()
        insert(dsn, [Call(NOW - timedelta(minutes=5), "t2", cost_usd=Decimal("3"))])

        def fail(self: Any, labels: Any) -> None:
            raise TypeError("unsupported operand")

        monkeypatch.setattr(spend_source.SpendSource, "weigh", fail)
        for _ in range(3):
            assert refresher.refresh() is False
        lines = _log_lines(caplog, "families not built")  # the 1st and the 2nd, not the 3rd
        assert [line["failures"] for line in lines] == [1, 2]
        assert {line["error_kind"] for line in lines} == {"TypeError"}
        samples = parse(refresher.snapshot.text)
        assert samples[SPEND] == 4  # the last families built, before t2's $3
        assert samples[key("scidex_exporter_refreshes_total")] == 4  # this refresh's health
        assert samples[key("scidex_exporter_refresh_failures_total")] == 3
        assert samples[key("scidex_exporter_query_success", query="spend_totals")] == 1
        monkeypatch.undo()
        assert refresher.refresh()
        assert len(_log_lines(caplog, "families built again")) == 1
        assert parse(refresher.snapshot.text)[SPEND] == 7
        monkeypatch.setattr(spend_source.SpendSource, "weigh", fail)
        assert refresher.refresh() is False
        assert _log_lines(caplog, "families not built")[-1]["failures"] == 1  # anew
        assert SPEND in parse(refresher.snapshot.text)
        clock[0] += refresher.settings.max_staleness_seconds + 1
        assert refresher.refresh() is False
        samples = parse(refresher.snapshot.text)
        assert not [k for k in samples if not k[0].startswith("scidex_exporter_")]  # a gap
        assert samples[key("scidex_exporter_refresh_failures_total")] == 5
    finally:
        refresher.close()


def test_a_renderer_failing_falls_back_to_prometheus_client(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renderer that reuses the last rendering is the exporter's own code: should it fail,
    the refresh publishes prometheus-client's rendering of the same families and logs one
    line; once it works again, the refreshes after render as before."""
    caplog.set_level(logging.INFO, logger="exporter.refresh")
    _ledger(dsn)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh()

        def fail(self: Any, families: Any) -> bytes:
            raise IndexError("list index out of range")

        monkeypatch.setattr(TextRenderer, "render", fail)
        insert(dsn, [Call(NOW - timedelta(minutes=5), "t2", cost_usd=Decimal("3"))])
        assert refresher.refresh()  # the data is good: only its rendering fell back
        (line,) = _log_lines(caplog, "rendered by prometheus-client")
        assert line["error_kind"] == "IndexError"
        snapshot = refresher.snapshot
        assert snapshot.text == generate_latest(Families(snapshot.families))
        assert gzip.decompress(snapshot.text_gzip) == snapshot.text
        assert parse(snapshot.text)[SPEND] == 7
        assert refresher.refresh()  # failing again: logged on the 1st, 2nd, 4th... in a row
        assert len(_log_lines(caplog, "rendered by prometheus-client")) == 2
        monkeypatch.undo()
        assert refresher.refresh()
        assert parse(refresher.snapshot.text)[SPEND] == 7
        assert refresher.snapshot.text == generate_latest(Families(refresher.snapshot.families))
        (line,) = _log_lines(caplog, "rendered again")
        assert line["failures"] == 2
        assert refresher.health.render_failing == 0
    finally:
        refresher.close()


def test_a_rendering_failing_both_ways_keeps_the_last_exposition(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should prometheus-client's renderer fail too (a value neither can write), the refresh
    fails with one line and never raises, and the last exposition is served on, its numbers
    and freshness as they were; the next refresh that renders publishes the failure."""
    caplog.set_level(logging.INFO, logger="exporter.refresh")
    _ledger(dsn)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh()
        before = refresher.snapshot

        def fail(*args: Any, **kwargs: Any) -> bytes:
            raise ValueError("cannot render this")

        monkeypatch.setattr(TextRenderer, "render", fail)
        monkeypatch.setattr(snapshot_module, "generate_latest", fail)
        insert(dsn, [Call(NOW - timedelta(minutes=5), "t2", cost_usd=Decimal("3"))])
        assert refresher.refresh() is False
        assert refresher.snapshot is before
        assert parse(before.text)[SPEND] == 4
        (line,) = _log_lines(caplog, "not rendered, the last exposition kept")
        assert line["error_kind"] == "ValueError"
        assert line["failures"] == 1
        assert not _log_lines(caplog, "rendered by prometheus-client")
        monkeypatch.undo()
        assert refresher.refresh()
        samples = parse(refresher.snapshot.text)
        assert samples[SPEND] == 7
        assert samples[key("scidex_exporter_refresh_failures_total")] == 1
        (line,) = _log_lines(caplog, "rendered again")
        assert line["failures"] == 1
    finally:
        refresher.close()


def test_stop_during_a_long_refresh_starts_no_further_query(dsn: str) -> None:
    """Shutdown cancels the running query and does not start the next ones (each may be slow)."""
    _ledger(dsn)
    settings = load_settings(
        {"dsn": dsn, "interval_seconds": 60, "port": 0, "listen": "127.0.0.1"}, env={}
    )
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE cost_ledger IN ACCESS EXCLUSIVE MODE")  # every spend query waits
    exporter = Exporter(settings).start()
    try:
        with psycopg.connect(dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline
                and not watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'resource-exporter'"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
            ):
                time.sleep(0.05)
        started = time.monotonic()
        exporter.stop()
        assert time.monotonic() - started < 2.0
    finally:
        blocker.close()
