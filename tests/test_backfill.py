"""Backfill + live: past days equal the ledger's daily sums, and the seam has no jump."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import psycopg
import pytest

from dashboards import __main__ as generator
from dashboards import grafana, resource, rules
from dashboards.resource import P
from exporter import generate
from exporter.config import load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from tests.conftest import temporary_database
from tests.ledger import FAMILY_OF, Call, insert, list_price
from tests.prom import Prometheus, create_blocks, running_prometheus
from tests.promql import panel_queries
from tests.test_dashboards_e2e import ALL, HISTORY, substitute

BOARD = grafana.render(resource.dashboard())
DAYS = 4


def _query(panel_id: P, ref: str = "A") -> str:
    for panel, target in panel_queries(BOARD):
        if panel["id"] == panel_id and target["refId"] == ref:
            return substitute(target["expr"], ALL)
    raise KeyError((panel_id, ref))


def _ledger(dsn: str) -> tuple[list[Any], list[Any]]:
    """Read back the valid cost rows and the allocations, to sum them in Python."""
    with psycopg.connect(dsn) as conn:
        calls = conn.execute("SELECT ts, quest, provider, cost_usd FROM cost_ledger").fetchall()
        budgets = conn.execute(
            "SELECT quest, day, allocated_usd FROM quest_budget_allocations"
        ).fetchall()
    return calls, budgets


def _value(result: list[dict[str, Any]]) -> float:
    (sample,) = result
    return float(sample["value"][1])


class Backfilled(NamedTuple):
    prom: Prometheus
    dsn: str
    now: datetime
    zone: ZoneInfo


@pytest.fixture(scope="module", params=["UTC", "Asia/Tokyo"])
def backfilled(
    pg_server: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Any:
    """The ledger's history backfilled into Prometheus, in the days of a timezone."""
    zone = request.param
    tmp = Path(tmp_path_factory.mktemp("backfill"))
    with temporary_database(pg_server, schema=True) as dsn:
        now = datetime.now(UTC)
        with psycopg.connect(dsn, autocommit=True) as conn:
            plan = generate.load(conn, 4000, seed=9, end=now, days=DAYS + 1)
            # The generator plans budgets to the UTC date of its last row; a zone ahead of UTC
            # may already be a day further: plan that day like the one before.
            conn.execute(
                "INSERT INTO quest_budget_allocations (quest, day, allocated_usd)"
                " SELECT quest, %(today)s, allocated_usd FROM quest_budget_allocations"
                " WHERE day = %(today)s - 1 ON CONFLICT DO NOTHING",
                {"today": now.astimezone(ZoneInfo(zone)).date()},
            )
        # Spend after the last full hour whatever the minute, so the 1h rates are not zero.
        recent = [q.name for q in plan.quests[:3]]
        insert(
            dsn,
            [
                Call(
                    now - timedelta(seconds=1), f"recent-{i}", quest=quest, cost_usd=Decimal("0.5")
                )
                for i, quest in enumerate(recent)
            ],
        )
        refresher = Refresher(load_settings({"dsn": dsn, "timezone": zone}, env={}))
        assert refresher.refresh(now)
        server = MetricsServer(refresher, "127.0.0.1", 0).start()
        try:
            history = tmp / "history.om"
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    "backfill",
                    "--dsn",
                    dsn,
                    "--days",
                    str(DAYS),
                    "--out",
                    str(history),
                    "--instance",
                    f"127.0.0.1:{server.port}",
                    "--timezone",
                    zone,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert run.returncode == 0, run.stderr
            create_blocks(history, tmp / "data")
            with running_prometheus(
                tmp,
                [f"127.0.0.1:{server.port}"],
                rule_files=[generator.RULES],
                storage=tmp / "data",
            ) as prom:
                prom.wait_for("count_over_time(scidex_exporter_build_info[1m]) >= 2")
                prom.wait_for(rules.QUEST_SPEND_RATE["1h"].name)
                yield Backfilled(prom, dsn, now, ZoneInfo(zone))
        finally:
            server.stop()
            refresher.close()


def _past_days(now: datetime, zone: tzinfo = UTC) -> list[date]:
    """The whole days of ``zone`` the backfill covers, before today."""
    today = now.astimezone(zone).date()
    first = (now - timedelta(days=DAYS)).astimezone(zone).date() + timedelta(days=1)
    return [first + timedelta(days=i) for i in range((today - first).days)]


def _midnight(day: date, zone: tzinfo = UTC) -> datetime:
    return datetime.combine(day, datetime.min.time(), zone)


def _midnight_after(day: date) -> float:
    return _midnight(day + timedelta(days=1)).timestamp()


def _daily(b: Backfilled, panel: P, ref: str, label: str | None = None) -> dict[Any, float]:
    """A daily panel's query as Grafana runs it: 1-day steps at the dashboard timezone's
    midnights (Grafana aligns the step to its UTC offset), up to today's midnight."""
    days = _past_days(b.now, b.zone)
    today = b.now.astimezone(b.zone).date()
    result = b.prom.query_range(
        _query(panel, ref),
        _midnight(days[0], b.zone).timestamp(),
        _midnight(today, b.zone).timestamp(),
        "1d",
    )
    out: dict[Any, float] = {}
    for series in result:
        for at, value in series["values"]:
            day = datetime.fromtimestamp(at, b.zone).date()
            out[day if label is None else (day, series["metric"][label])] = float(value)
    return out


def _local_day(ts: datetime, zone: tzinfo) -> date:
    return ts.astimezone(zone).date()


@pytest.mark.prometheus
def test_timeline_shows_each_day_of_the_timezone_as_in_the_ledger(backfilled: Backfilled) -> None:
    b = backfilled
    calls, budgets = _ledger(b.dsn)
    spend: dict[date, float] = defaultdict(float)
    for ts, _, _, cost in calls:
        spend[_local_day(ts, b.zone)] += float(cost)
    budget: dict[date, float] = defaultdict(float)
    for _, day, allocated in budgets:
        budget[day] += float(allocated)
    days = _past_days(b.now, b.zone)
    today = b.now.astimezone(b.zone).date()
    assert len(days) >= DAYS - 1
    whole = _daily(b, P.DAILY_SPEND_VS_BUDGET, "A")
    assert set(whole) == set(days)
    for day in days:
        assert whole[day] == pytest.approx(spend[day], rel=1e-9), day
    # Today so far: its own series. increase() extrapolates past the last sample by up to half
    # the average interval between samples, and the backfilled hours are sparse (a sample when
    # a counter moved): at least the ledger's spend, not far above it. With live samples every
    # scrape interval, the overshoot is a few seconds' spend.
    partial = _daily(b, P.DAILY_SPEND_VS_BUDGET, "B")
    assert set(partial) == {today}
    assert spend[today] * (1 - 1e-9) <= partial[today] <= spend[today] * 1.5
    allocated = _daily(b, P.DAILY_SPEND_VS_BUDGET, "C")
    for day in [*days, today]:
        assert allocated[day] == pytest.approx(budget[day], rel=1e-9), day


@pytest.mark.prometheus
def test_provider_timeline_shows_each_day_of_the_timezone_as_in_the_ledger(
    backfilled: Backfilled,
) -> None:
    b = backfilled
    calls, _ = _ledger(b.dsn)
    spend: dict[tuple[date, str], float] = defaultdict(float)
    for ts, _, provider, cost in calls:
        spend[(_local_day(ts, b.zone), FAMILY_OF[provider])] += float(cost)
    today = b.now.astimezone(b.zone).date()
    whole = _daily(b, P.DAILY_SPEND_BY_PROVIDER, "A", "provider")
    partial = _daily(b, P.DAILY_SPEND_BY_PROVIDER, "B", "provider")
    assert {day for day, _ in whole} == set(_past_days(b.now, b.zone))
    assert {day for day, _ in partial} == {today}
    for key in set(whole) | {k for k in spend if k[0] in _past_days(b.now, b.zone)}:
        assert whole.get(key, 0.0) == pytest.approx(spend.get(key, 0.0), rel=1e-9), key
    for key in set(partial) | {k for k in spend if k[0] == today}:
        ledger = spend.get(key, 0.0)
        assert ledger * (1 - 1e-9) <= partial.get(key, 0.0) <= ledger * 1.5, key


@pytest.mark.prometheus
def test_no_reset_and_no_jump_at_the_backfill_live_seam(backfilled: Any) -> None:
    prom, dsn, now, _ = backfilled
    seam = now.replace(minute=0, second=0, microsecond=0)  # the last backfilled sample
    (live,) = prom.query("max(timestamp(scidex_spend_usd_total))")
    live_at = float(live["value"][1])
    assert live_at > seam.timestamp()
    window = f"{round((live_at - seam.timestamp()) * 1000)}ms"
    resets = prom.query(f"sum(resets(scidex_spend_usd_total[{DAYS + 1}d]))", at=live_at)
    assert _value(resets) == 0
    calls, _ = _ledger(dsn)
    since_seam = sum(float(cost) for ts, _, _, cost in calls if ts >= seam)
    got = _value(prom.query(f"sum(increase(scidex_spend_usd_total[{window}]))", at=live_at))
    assert got == pytest.approx(since_seam, rel=1e-9)
    before = _value(prom.query("sum(scidex_spend_usd_total)", at=seam.timestamp()))
    after = _value(prom.query("sum(scidex_spend_usd_total)", at=live_at))
    assert after - before == pytest.approx(since_seam, rel=1e-9)


@pytest.mark.prometheus
def test_budget_exhaustion_forecast_from_history(backfilled: Any) -> None:
    """The forecast panel: what is left of today's budget over the last hour's spend rate."""
    assert (P.EXHAUSTION_HOURS, "A") in HISTORY
    prom, dsn, now, zone = backfilled
    calls, budgets = _ledger(dsn)
    today = now.astimezone(zone).date()
    midnight = _midnight(today, zone)
    spent: dict[str, float] = defaultdict(float)
    for ts, quest, _, cost in calls:
        if ts >= midnight:
            spent[quest] += float(cost)
    allocated = {quest: float(a) for quest, day, a in budgets if day == today}
    prom.wait_for(rules.QUEST_EXHAUSTION_HOURS.name)
    time.sleep(0.6)  # so the instant read below comes after the first evaluation with a result
    # Both recorded series from the same rule evaluation: Prometheus commits each rule's samples
    # as it goes, so "now" can see the rate of an evaluation still under way and the forecast of
    # the one before. Half an evaluation interval back, every evaluation up to then is complete.
    at = time.time() - 0.5
    rates = {
        s["metric"]["quest"]: float(s["value"][1])
        for s in prom.query(rules.QUEST_SPEND_RATE["1h"].name, at=at)
    }
    result = prom.query(_query(P.EXHAUSTION_HOURS), at=at)
    got = {s["metric"]["quest"]: float(s["value"][1]) for s in result}
    assert got, "no forecast on a ledger with spend in the last hour"
    assert set(got) == {q for q, r in rates.items() if r > 0 and q in allocated}
    for quest, hours in got.items():
        left = max(allocated[quest] - spent[quest], 0.0)
        assert hours == pytest.approx(left / (rates[quest] * 3600), rel=1e-6), quest


def _calls(dsn: str) -> list[Call]:
    """The cost rows as the reference model's calls (all generated rows are valid)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT ts, task_id, quest, layer, provider, model, input_tokens, output_tokens,"
            " cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_usd FROM cost_ledger"
        ).fetchall()
    names: tuple[str, ...] = ("ts", "task_id", "quest", "layer", "provider", "model")
    names += ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    names += ("reasoning_tokens",)
    return [Call(**dict(zip(names, row[:11], strict=True)), cost_usd=row[11]) for row in rows]


def _check_day(
    prom: Any, at: float, panel: P, ref: str, labels: tuple[str, ...], want: dict[Any, float]
) -> None:
    """A panel query at the midnight after a day against the ledger's sums of that day."""
    result = prom.query(_query(panel, ref), at=at)
    got = {tuple(s["metric"][k] for k in labels): float(s["value"][1]) for s in result}
    # A series the ledger has shows 0 on a day without its calls.
    assert set(want) <= set(got), (panel, at)
    for key in got:
        assert got[key] == pytest.approx(want.get(key, 0.0), rel=1e-9), (panel, at, key)


@pytest.mark.prometheus
def test_model_and_cache_panels_show_each_past_day_as_in_the_ledger(backfilled: Any) -> None:
    prom, dsn, now, _ = backfilled
    calls = _calls(dsn)
    for day in _past_days(now):
        of_day = [c for c in calls if c.ts.astimezone(UTC).date() == day]  # type: ignore[union-attr]
        spend: dict[tuple[str, ...], float] = defaultdict(float)
        tokens: dict[tuple[str, ...], float] = defaultdict(float)
        # (cache reads, fresh input) by provider family and by model
        inputs: dict[str, dict[tuple[str, ...], list[float]]] = {
            "provider": defaultdict(lambda: [0.0, 0.0]),
            "model": defaultdict(lambda: [0.0, 0.0]),
        }
        unpriced_calls: dict[tuple[str, ...], float] = defaultdict(float)
        unpriced_tokens: dict[tuple[str, ...], float] = defaultdict(float)
        for c in of_day:
            model, family = c.model_label(), FAMILY_OF[c.provider]  # type: ignore[index]
            spend[(model,)] += float(c.cost_usd)  # type: ignore[arg-type]
            tokens[(model,)] += float(sum(c.categories().values()))
            for by, key in (("provider", family), ("model", model)):
                inputs[by][(key,)][0] += float(c.categories()["cache_read"])
                inputs[by][(key,)][1] += float(c.categories()["input"])
            if list_price(c) is None:
                unpriced_calls[(family, model)] += 1
                unpriced_tokens[(family, model)] += float(sum(c.categories().values()))
        assert len(spend) <= 10 and unpriced_calls  # every model is in the top 10
        at = _midnight_after(day)

        _check_day(prom, at, P.SPEND_BY_MODEL, "A", ("model",), spend)
        _check_day(prom, at, P.TOKENS_BY_MODEL, "A", ("model",), tokens)
        for panel in (P.SPEND_BY_MODEL, P.TOKENS_BY_MODEL):  # nothing beyond the top 10
            # (a sum minus the sum of its top 10: zero up to float rounding)
            assert _value(prom.query(_query(panel, "B"), at=at)) == pytest.approx(0, abs=1e-9)
        for panel, by in (
            (P.CACHE_SHARE_BY_PROVIDER, "provider"),
            (P.CACHE_SHARE_BY_MODEL, "model"),
        ):
            share = {k: r / (r + f) for k, (r, f) in inputs[by].items() if r + f > 0}
            _check_day(prom, at, panel, "A", (by,), share)
        _check_day(prom, at, P.UNPRICED, "A", ("provider", "model"), unpriced_calls)
        _check_day(prom, at, P.UNPRICED, "B", ("provider", "model"), unpriced_tokens)


@pytest.mark.prometheus
def test_month_forecast_from_history(backfilled: Any) -> None:
    """The month panel's forecast: the month's spend so far plus the 7-day rate until its end.

    The backfilled days cross the turn of a month early in a month: spend before the 1st is in
    the rate, not in the month's spend.
    """
    prom, dsn, now, zone = backfilled
    calls, budgets = _ledger(dsn)
    first = now.astimezone(zone).date().replace(day=1)
    month_start = _midnight(first, zone)
    following = (first + timedelta(days=31)).replace(day=1)
    month_end = _midnight(following, zone).timestamp()
    spent: dict[str, float] = defaultdict(float)
    for ts, quest, _, cost in calls:
        if ts >= month_start:
            spent[quest] += float(cost)
    for quest, day, _ in budgets:
        if first <= day < following:
            spent[quest] += 0.0
    prom.wait_for(rules.QUEST_MONTH_FORECAST.name)
    time.sleep(0.6)
    at = time.time() - 0.5
    rates = {
        s["metric"]["quest"]: float(s["value"][1])
        for s in prom.query(rules.QUEST_SPEND_RATE_7D.name, at=at)
    }
    assert sum(rates.values()) > 0
    got = _value(prom.query(_query(P.MONTH_VS_BUDGET, "D"), at=at))
    want = sum(s + rates.get(q, 0.0) * (month_end - at) for q, s in spent.items())
    # The rule ran up to an evaluation interval (1 s) before ``at``.
    assert got == pytest.approx(want, abs=sum(rates.values()) * 2 + 1e-9)
    assert got > _value(prom.query(_query(P.MONTH_VS_BUDGET, "A"), at=at))
