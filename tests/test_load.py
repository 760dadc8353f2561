"""Load: concurrent scrapers while refreshes run on a large, growing ledger (bounded run)."""

from __future__ import annotations

import re
import time
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from bench.load import (
    PROMETHEUS,
    exporter_process,
    footprint_kib,
    growing,
    hammer,
    peak_rss_kib,
    private_kib,
    rss_kib,
    server_pid,
)
from exporter import generate
from exporter.config import env_var
from tests.conftest import one
from tests.ledger import Call, exclusion_reason, insert, key, parse, relax, valid

SCRAPERS = 20
SECONDS = 8.0
MAX_REQUESTS = 4000
LEDGER_ROWS = 200_000


def test_concurrent_scrapes_during_refreshes(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        plan = generate.load(conn, LEDGER_ROWS, seed=3)
    # By refresh and format (OpenMetrics: what Prometheus asks for, gzipped; or plain text).
    bodies: dict[tuple[float, bool], set[bytes]] = defaultdict(set)

    def record(body: bytes) -> None:
        refresh = re.search(rb"^scidex_exporter_refreshes_total (\S+)$", body, re.M)
        assert refresh and body.endswith(b"\n"), "a torn or truncated exposition"
        bodies[float(refresh.group(1)), body.endswith(b"# EOF\n")].add(body)

    with exporter_process(empty_dsn, interval=0.5) as (url, pid), growing(empty_dsn, plan):
        time.sleep(2)  # a few refreshes to warm up
        rss_before = footprint_kib(pid)
        asks: tuple[dict[str, str], ...] = ({}, PROMETHEUS)  # half the scrapers each
        result = hammer(url, SCRAPERS, SECONDS, MAX_REQUESTS, record, asks)
        rss_after = footprint_kib(pid)
    assert result.errors == []
    assert result.requests >= 200, "the scrapers barely ran"
    refreshes = sorted({refresh for refresh, _ in bodies})
    assert len(refreshes) >= 3, "refreshes did not run during the load"
    spends, both = [], 0
    for refresh in refreshes:
        # One refresh, one body in each format: nothing torn or mixed. Each parses (OpenMetrics
        # strictly), with no duplicate series, and the two hold the same samples.
        text, openmetrics = (bodies.get((refresh, om), set()) for om in (False, True))
        assert len(text) <= 1 and len(openmetrics) <= 1, refresh
        samples = [parse(b) for b in text] + [parse(b, openmetrics=True) for b in openmetrics]
        assert all(s == samples[0] for s in samples[1:]), refresh
        both += len(samples) == 2
        spends.append(sum(v for k, v in samples[0].items() if k[0] == "scidex_spend_usd_total"))
    assert both >= 2, "few refreshes were scraped in both formats"
    assert spends == sorted(spends) and spends[-1] > spends[0], "the numbers did not move"
    assert rss_after <= rss_before * 1.25 + 10_000, (rss_before, rss_after)


def test_the_refresh_benchmark_s_baseline_queries_sum_the_ledger(dsn: str) -> None:
    """bench.refresh runs for minutes outside the suite; the queries it gives query-exporter
    must still run on the contract's schema and sum what the reference model sums."""
    from bench.refresh import QE_QUERIES

    day = datetime(2026, 11, 20, tzinfo=UTC)
    calls = [
        Call(day, "t1", "q-a", "Forge", "bedrock/x", 100, 50, Decimal("1.5"), cache_read_tokens=7),
        Call(day, "t2", "q-a", "Forge", "bedrock/x", 10, 5, Decimal("0.25"), model="m"),
        Call(day, "t3", "q-b", "Agora", "glm-4.6", 1, 2, Decimal("3")),
        Call(day, "t4", "q-b", "Agora", "glm-4.6", -1, 2, Decimal("9")),  # invalid tokens
        Call(day, "t5", "q-b", "Agora", "glm-4.6", 1, 2, Decimal("NaN")),
        Call(None, "t6", "q-b", "Agora", "glm-4.6", 1, 2, Decimal("1")),
    ]
    relax(dsn)  # a NULL time, as a user's view may have
    insert(dsn, calls)
    spend: dict[tuple[str, ...], list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 4)
    excluded: dict[str, int] = defaultdict(int)
    for c in calls:
        if not valid(c):
            excluded[exclusion_reason(c)] += 1
            continue
        sums = spend[(c.quest, c.layer, c.provider)]  # type: ignore[index]
        for i, value in enumerate((c.cost_usd, c.input_tokens, c.output_tokens, 1)):
            sums[i] += value  # type: ignore[operator]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(QE_QUERIES["spend"][1]).fetchall()
        assert {tuple(r[:3]): list(r[3:]) for r in rows} == spend
        rows = conn.execute(QE_QUERIES["excluded"][1]).fetchall()
        assert {reason: n for reason, n in rows if n} == excluded
        by_model = conn.execute(QE_QUERIES["models"][1]).fetchall()
        assert sum(r[4] for r in by_model) == sum(s[0] for s in spend.values())
        assert sum(r[7] for r in by_model) == 7  # the cache-read tokens


@pytest.mark.parametrize("apart", [False, True], ids=["one process", "server process"])
def test_the_refresh_benchmark_measures_an_exporter_with_no_database(apart: bool) -> None:
    """bench.refresh's runtime-alone RSS: a served exporter that only ever fails to connect;
    with a server process, what that holds of its own is counted too."""
    from bench.refresh import refreshed, unreachable_dsn

    env = {env_var("server_process"): str(apart).lower()}
    with exporter_process(unreachable_dsn(), 0.2, refreshed(3), env) as (url, pid):
        samples = parse(urllib.request.urlopen(url).read())
        peak, now = peak_rss_kib(pid), rss_kib(pid)
        server = server_pid(pid)
        assert (server is not None) is apart
        own = private_kib(server) if server else 0
        total = footprint_kib(pid, peak=True)
    refreshes = samples[key("scidex_exporter_refreshes_total")]
    assert refreshes >= 3
    assert samples[key("scidex_exporter_refresh_failures_total")] == refreshes
    assert samples[key("scidex_exporter_database_up")] == 0
    assert not any(name == "scidex_spend_usd_total" for name, _ in samples)
    assert peak >= now > 0
    if apart:
        assert 0 < own < now  # a forked server shares some of its pages
    assert abs(total - (peak + own)) < 1024  # its own pages added (give or take a page or two)


def test_a_refresh_says_where_it_spent_its_time(dsn: str) -> None:
    """bench.refresh reports these phases; they must be measured, and add up."""
    from bench.refresh import phases
    from exporter.config import load_settings
    from exporter.refresh import Refresher
    from exporter.sources import KINDS
    from tests.ledger import Call, insert

    now = datetime.now(UTC)
    insert(dsn, [Call(now - timedelta(hours=i), f"t{i}") for i in range(40)])
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh()
        split = phases(refresher)
    finally:
        refresher.close()
    assert {f"{kind.__name__}: families" for kind in KINDS} <= set(split)
    for query, health in refresher.health.queries.items():
        assert 0 < health.database <= health.duration, query
    assert split["rendering"] > 0
    queries = sum(h.duration for h in refresher.health.queries.values())
    assert queries <= refresher.health.refresh_duration  # the queries run inside it


def test_the_benchmarks_load_a_ledger_into_a_database_of_their_own_on_a_given_server(
    pg_server: str,
) -> None:
    """bench.refresh --server: each ledger goes into a database the run creates on that
    server (named for its size), and the run drops it, rows and all, when it ends."""
    from bench.load import database

    def names() -> set[str]:
        with psycopg.connect(pg_server) as admin:
            return {n for (n,) in admin.execute("SELECT datname FROM pg_database")}

    before = names()
    with database(pg_server, "ri_bench_42") as dsn:
        assert names() == before | {"ri_bench_42"}
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert one(conn, "SELECT current_database()") == ("ri_bench_42",)
            conn.execute("CREATE TABLE t AS SELECT 1 AS n")
        left_open = psycopg.connect(dsn)  # a session the run did not close
        assert left_open.execute("SELECT n FROM t").fetchall() == [(1,)]
    try:
        assert names() == before
    finally:
        left_open.close()


def test_the_refresh_benchmark_compares_steady_refreshes_within_rounds(empty_dsn: str) -> None:
    """bench.refresh's steady / steady column: each round's ratio to the first size, then the
    median, with every round adding its batch of rows and refreshing each size once."""
    from statistics import median

    from bench.refresh import Steady, steady_rounds

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        plan = generate.load(conn, 2_000, seed=5)
    sizes = [Steady(empty_dsn, plan, batch=50), Steady(empty_dsn, plan, batch=50)]
    try:
        with psycopg.connect(empty_dsn) as conn:
            before = one(conn, "SELECT count(*) FROM cost_ledger")[0]
        ratios = steady_rounds(sizes, 3)
        with psycopg.connect(empty_dsn) as conn:
            after = one(conn, "SELECT count(*) FROM cost_ledger")[0]
    finally:
        for size in sizes:
            size.close()
    first, second = (size.times for size in sizes)
    assert len(first) == len(second) == 3
    assert after - before == 2 * 3 * 50
    assert ratios == [1.0, median(b / a for a, b in zip(first, second, strict=True))]
    assert sizes[1].medians()[0] == median(second)


def test_bench_load_reads_wrk_durations() -> None:
    from bench.load import seconds

    assert [seconds(d) for d in ("850.00us", "9.22ms", "1.21s", "2.00m")] == pytest.approx(
        [0.00085, 0.00922, 1.21, 120.0]
    )
    with pytest.raises(ValueError, match="not a wrk duration"):
        seconds("9.22 ms")


def test_bench_load_soak_notes_each_refresh_s_duration() -> None:
    """The soak's table names the rebuilds it held: the longest refreshes it saw."""
    from bench.load import Durations

    durations = Durations()
    for count, took in ((7, "0.05"), (8, "0.25"), (8, "0.25"), (9, "26.5"), (10, "0.04")):
        durations.note(
            b"# TYPE scidex_exporter_refreshes counter\n"
            + f"scidex_exporter_refreshes_total {count}.0\n".encode()
            + b'scidex_exporter_query_duration_seconds{query="spend"} 99.0\n'
            + f"scidex_exporter_refresh_duration_seconds {took}\n# EOF\n".encode()
        )
    durations.note(b"scidex_exporter_refreshes_total 11.0\n")  # no duration: not noted
    assert durations.seconds == {7.0: 0.05, 8.0: 0.25, 9.0: 26.5, 10.0: 0.04}
    assert str(durations) == "4, median 0.15 s, longest 26.50, 0.25, 0.05 s"
    assert str(Durations()) == "none"
