"""Serving: scrapes read the snapshot only, refreshes never overlap, HTTP behaves."""

from __future__ import annotations

import gzip
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from exporter.config import load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from exporter.service import Exporter
from tests.conftest import one
from tests.ledger import Call, Impact, insert, key, parse

NOW = datetime.now(UTC)
TABLES = "cost_ledger, impact_ledger, quest_budget_allocations"


def get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def ledger(dsn: str) -> str:
    insert(
        dsn,
        [
            Call(NOW - timedelta(hours=1), "t1", cost_usd=Decimal("2.5")),
            Call(NOW - timedelta(hours=2), "t2", provider="glm-4.6", cost_usd=Decimal("1")),
        ],
        [Impact("t1", 5.0)],
    )
    return dsn


@pytest.fixture
def served(ledger: str) -> Iterator[tuple[Refresher, str]]:
    refresher = Refresher(load_settings({"dsn": ledger}, env={}))
    assert refresher.refresh()
    server = MetricsServer(refresher, "127.0.0.1", 0).start()
    try:
        yield refresher, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        refresher.close()


def hold_locks(dsn: str) -> psycopg.Connection:
    """Open a transaction that holds ACCESS EXCLUSIVE locks on every ledger relation."""
    conn = psycopg.connect(dsn)
    conn.execute(f"LOCK TABLE {TABLES} IN ACCESS EXCLUSIVE MODE")
    return conn


def test_scrapes_never_touch_the_database(served: tuple[Refresher, str], ledger: str) -> None:
    refresher, url = served
    expected = refresher.snapshot.text
    blocker = hold_locks(ledger)
    try:
        started = time.perf_counter()
        for _ in range(20):
            status, _, body = get(url + "/metrics", timeout=1.0)
            assert status == 200 and body == expected
        assert time.perf_counter() - started < 2.0
    finally:
        blocker.close()
    samples = parse(expected)
    assert (
        samples[key("scidex_spend_usd_total", quest="q-a", layer="Forge", provider="bedrock")]
        == 2.5
    )
    assert samples[key("scidex_provider_tasks", provider="glm")] == 1


def test_a_refresh_while_one_runs_is_skipped_not_overlapped(ledger: str) -> None:
    refresher = Refresher(load_settings({"dsn": ledger}, env={}))
    blocker = hold_locks(ledger)
    results: list[bool] = []
    first = threading.Thread(target=lambda: results.append(refresher.refresh()))
    first.start()
    try:
        time.sleep(0.5)  # the first refresh is now waiting for the lock
        assert first.is_alive()
        assert refresher.refresh() is False
        assert refresher.health.skipped == 1
    finally:
        blocker.close()
    first.join(timeout=10)
    assert results == [True]
    refresher.close()
    samples = parse(refresher.snapshot.text)
    assert samples[key("scidex_exporter_refreshes_total")] == 1
    assert samples[key("scidex_exporter_refresh_skipped_total")] == 1


def test_where_a_refresh_spends_its_time_is_published(ledger: str) -> None:
    refresher = Refresher(load_settings({"dsn": ledger}, env={}))
    assert refresher.refresh()
    first = parse(refresher.snapshot.text)
    rendered = refresher.health.render_seconds
    assert refresher.refresh()
    refresher.close()
    second = parse(refresher.snapshot.text)
    # A refresh renders after building its families: the first has no rendering to publish,
    # the second publishes the first's.
    assert key("scidex_exporter_render_duration_seconds") not in first
    assert rendered is not None and rendered > 0
    assert second[key("scidex_exporter_render_duration_seconds")] == rendered
    for samples in (first, second):
        built = {
            dict(k[1])["source"]: v
            for k, v in samples.items()
            if k[0] == "scidex_exporter_build_duration_seconds"
        }
        assert set(built) == {"spend", "window", "budget"}
        assert all(v > 0 for v in built.values())
        queries = {dict(k[1])["query"] for k in samples if k[0] == "scidex_exporter_query_success"}
        assert queries == {"spend_totals", "newest_call", "budget_today", "window_tasks"}
        for query in queries:
            waited = samples[key("scidex_exporter_query_database_seconds", query=query)]
            # Some Python runs around every statement: strictly less.
            assert 0 < waited < samples[key("scidex_exporter_query_duration_seconds", query=query)]


def _active_exporter_backends(conn: psycopg.Connection) -> int:
    (n,) = one(
        conn,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'resource-exporter' AND state = 'active'",
    )
    return int(n)


def test_scheduler_never_runs_two_refreshes_at_once(ledger: str) -> None:
    settings = load_settings(
        {"dsn": ledger, "interval_seconds": 0.2, "port": 0, "listen": "127.0.0.1"}, env={}
    )
    blocker = hold_locks(ledger)
    exporter = Exporter(settings).start()
    try:
        with psycopg.connect(ledger, autocommit=True) as watcher:
            peak = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                peak = max(peak, _active_exporter_backends(watcher))
                time.sleep(0.05)
        assert peak == 1
        assert exporter.refresher.health.skipped >= 3
        assert exporter.refresher.health.refreshes == 0
    finally:
        blocker.close()
    deadline = time.monotonic() + 5
    while exporter.refresher.health.refreshes == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    exporter.stop()
    assert exporter.refresher.health.refreshes >= 1


def test_a_serving_exporter_hands_a_waiting_scrape_the_gil_within_a_tenth_of_a_millisecond(
    ledger: str,
) -> None:
    settings = load_settings({"dsn": ledger, "port": 0, "listen": "127.0.0.1"}, env={})
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # Python's default
    exporter = Exporter(settings).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        exporter.stop()
        sys.setswitchinterval(before)


def test_http_negotiates_openmetrics_and_gzip(served: tuple[Refresher, str]) -> None:
    refresher, url = served
    status, headers, body = get(url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body == refresher.snapshot.text
    _, headers, body = get(url + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == refresher.snapshot.text
    _, headers, body = get(
        url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"scidex_spend_usd_total{" in body
    assert get(url + "/")[0] == 200
    assert get(url + "/-/healthy")[0] == 200
    assert get(url + "/nope")[0] == 404


def test_database_down_at_start_serves_health_saying_so(empty_dsn: str) -> None:
    dead = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    refresher = Refresher(load_settings({"dsn": dead}, env={}))
    assert refresher.refresh() is False
    samples = parse(refresher.snapshot.text)
    assert samples[key("scidex_exporter_database_up")] == 0
    assert samples[key("scidex_exporter_query_errors_total", query="spend_totals")] == 1
    assert samples[key("scidex_exporter_refresh_failures_total")] == 1
    assert not [k for k in samples if k[0] == "scidex_spend_usd_total"]


def test_exporter_session_is_read_only(ledger: str) -> None:
    from exporter.refresh import connect

    conn = connect(load_settings({"dsn": ledger}, env={}))
    try:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM cost_ledger")
    finally:
        conn.close()
    with psycopg.connect(ledger) as check:
        assert check.execute("SELECT count(*) FROM cost_ledger").fetchone() == (2,)


def test_a_client_hanging_up_mid_response_is_one_debug_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    import socket
    import struct
    from types import SimpleNamespace

    from exporter.snapshot import Snapshot

    big = SimpleNamespace(snapshot=Snapshot.of(()))
    big.snapshot = Snapshot((), gzip.compress(b"# many series\n" * 400_000, mtime=0))
    server = MetricsServer(big, "127.0.0.1", 0).start()
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(1024)
                # Reset instead of a clean close, as a timed-out scraper does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
        assert get(f"http://127.0.0.1:{server.port}/-/healthy")[0] == 200
    finally:
        server.stop()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Exception occurred" not in captured.err


def test_ready_means_serving_data_younger_than_the_staleness_bound(ledger: str) -> None:
    """/-/ready: 503 before the first good refresh and once the data is older than
    max_staleness_seconds; /-/healthy answers throughout."""
    down = Refresher(load_settings({"dsn": "postgresql://x@127.0.0.1:1/none"}, env={}))
    server = MetricsServer(down, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert get(url + "/-/ready")[0] == 503  # nothing refreshed yet
        assert not down.refresh()
        assert get(url + "/-/ready")[0] == 503  # the database is out of reach
        assert get(url + "/-/healthy")[0] == 200
    finally:
        server.stop()
        down.close()
    refresher = Refresher(load_settings({"dsn": ledger, "max_staleness_seconds": 1.5}, env={}))
    server = MetricsServer(refresher, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert refresher.refresh()
        assert get(url + "/-/ready") == (200, get(url + "/-/ready")[1], b"OK\n")
        deadline = time.monotonic() + 10
        while get(url + "/-/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # no refresh: the data ages past the bound
        assert get(url + "/-/ready")[0] == 503
        assert get(url + "/-/healthy")[0] == 200
        assert refresher.refresh()
        assert get(url + "/-/ready")[0] == 200
    finally:
        server.stop()
        refresher.close()
