"""Every panel query, evaluated by a real Prometheus scraping the exporter, against the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from dashboards import __main__ as generator
from dashboards import grafana, resource
from dashboards.config import DEFAULT
from dashboards.resource import P
from exporter import generate
from exporter.config import load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from tests.conftest import temporary_database
from tests.ledger import Budget, Call, Rules, expected, from_plan, insert
from tests.prom import Prometheus, running_prometheus
from tests.promql import panel_queries

BOARD = grafana.render(resource.dashboard())
ALL = {**dict.fromkeys(grafana.FILTER_LABELS, ".*"), grafana.BASIS_VAR: "0"}
LIST_BASIS = {**ALL, grafana.BASIS_VAR: "1"}

Want = dict[Any, float]
Series = dict[tuple[str, ...], float]


def substitute(expr: str, selection: dict[str, str]) -> str:
    """Replace dashboard variables the way Grafana does for a regex (multi-value) variable."""
    for name, value in selection.items():
        expr = expr.replace(f"${name}", value)
    return expr


def values(want: Want, name: str, *labels: str) -> Series:
    """The reference series of ``name``, keyed by the values of ``labels``, summed."""
    out: Series = {}
    for (metric, lbls), v in want.items():
        if metric == name:
            d = dict(lbls)
            key = tuple(d[label] for label in labels)
            out[key] = out.get(key, 0.0) + v
    return out


def total(want: Want, name: str) -> float:
    return sum(values(want, name).values())


def top(series: Series, n: int) -> Series:
    return dict(sorted(series.items(), key=lambda kv: -kv[1])[:n])


TASK = ("task_id", "quest", "layer")
S = "scidex_"

# (panel id, refId) -> (labels keying the result, expected value from the reference model).
EXPECTED: dict[tuple[P, str], tuple[tuple[str, ...], Callable[[Want], Any]]] = {
    (P.SPEND_TODAY, "A"): ((), lambda w: total(w, S + "quest_spend_today_usd")),
    (P.BUDGET_TODAY, "A"): ((), lambda w: total(w, S + "budget_allocated_usd")),
    (P.UTILIZATION, "A"): (
        (),
        lambda w: total(w, S + "quest_spend_today_usd") / total(w, S + "budget_allocated_usd"),
    ),
    (P.WINDOW_SPEND, "A"): ((), lambda w: total(w, S + "quest_window_spend_usd")),
    (P.IMPACT_PER_USD, "A"): (
        (),
        lambda w: (
            total(w, S + "quest_window_impact_score") / total(w, S + "quest_window_spend_usd")
        ),
    ),
    (P.WASTED, "A"): ((), lambda w: total(w, S + "wasted_usd")),
    (P.WASTE_SHARE, "A"): (
        (),
        lambda w: total(w, S + "wasted_usd") / total(w, S + "quest_window_spend_usd"),
    ),
    (P.WINDOW_TOKENS, "A"): ((), lambda w: total(w, S + "provider_tokens")),
    (P.ALLOCATION_PIE, "A"): (
        ("quest",),
        lambda w: top(values(w, S + "budget_allocated_usd", "quest"), DEFAULT.mixin.top_quests),
    ),
    (P.ALLOCATION_PIE, "B"): (
        (),
        lambda w: (
            total(w, S + "budget_allocated_usd")
            - sum(
                top(
                    values(w, S + "budget_allocated_usd", "quest"), DEFAULT.mixin.top_quests
                ).values()
            )
        ),
    ),
    (P.UTILIZATION_BY_QUEST, "A"): (
        ("quest",),
        lambda w: values(w, S + "budget_utilization_ratio", "quest"),
    ),
    (P.TOP_TASKS, "A"): (
        TASK,
        lambda w: values(w, S + "task_impact_per_usd", *TASK),
    ),
    (P.TOP_TASKS, "B"): (TASK, lambda w: values(w, S + "task_cost_usd", *TASK)),
    (P.TOP_TASKS, "C"): (
        TASK,
        lambda w: values(w, S + "task_impact_score", *TASK),
    ),
    (P.QUEST_IMPACT_PER_USD, "A"): (
        ("quest",),
        lambda w: top(values(w, S + "quest_impact_per_usd", "quest"), 10),
    ),
    (P.PROVIDER_TABLE, "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_spend_usd", "provider"),
    ),
    (P.PROVIDER_TABLE, "B"): (
        ("provider",),
        lambda w: values(w, S + "provider_list_price_usd", "provider"),
    ),
    (P.PROVIDER_TABLE, "C"): (
        ("provider",),
        lambda w: values(w, S + "provider_tasks", "provider"),
    ),
    (P.PROVIDER_TABLE, "D"): (
        ("provider",),
        lambda w: values(w, S + "provider_tokens", "provider"),
    ),
    (P.PROVIDER_TABLE, "E"): (
        ("provider",),
        lambda w: values(w, S + "provider_avg_cost_per_task_usd", "provider"),
    ),
    (P.PROVIDER_PIE, "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_spend_usd", "provider"),
    ),
    (P.PROVIDER_TOKENS, "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_tokens", "provider"),
    ),
    (P.TOP_WASTED_TASKS, "A"): (TASK, lambda w: values(w, S + "task_wasted_tokens", *TASK)),
    (P.TOP_WASTED_TASKS, "B"): (TASK, lambda w: values(w, S + "task_wasted_usd", *TASK)),
    (P.WASTE_BY_QUEST, "A"): (("quest",), lambda w: values(w, S + "wasted_usd", "quest")),
    (P.FAILED_QUERIES, "A"): ((), lambda w: 0.0),
    (P.EXCLUDED_ROWS, "A"): ((), lambda w: total(w, S + "ledger_excluded_rows")),
    (P.MONTH_VS_BUDGET, "A"): ((), lambda w: total(w, S + "quest_spend_month_usd")),
    (P.MONTH_VS_BUDGET, "B"): ((), lambda w: total(w, S + "budget_allocated_month_to_date_usd")),
    (P.MONTH_VS_BUDGET, "C"): ((), lambda w: total(w, S + "budget_allocated_month_usd")),
    # Nothing is spent while Prometheus watches: a 7-day rate of 0, the forecast is the spend so
    # far (tests/test_backfill.py checks it with history).
    (P.MONTH_VS_BUDGET, "D"): ((), lambda w: total(w, S + "quest_spend_month_usd")),
    (P.SERIES, "A"): ((), lambda w: float(len(w))),
    (P.WINDOW, "A"): ((), lambda w: Rules().window / timedelta(days=1)),
    (P.GRACE, "A"): ((), lambda w: Rules().grace / timedelta(hours=1)),
}
# Queries whose numbers depend on the clock or on history; checked for data and sanity.
TIMELY = {
    (P.DAILY_SPEND_VS_BUDGET, "A"),
    (P.DAILY_SPEND_VS_BUDGET, "B"),
    (P.DAILY_SPEND_VS_BUDGET, "C"),
    (P.DAILY_SPEND_BY_PROVIDER, "A"),
    (P.DAILY_SPEND_BY_PROVIDER, "B"),
    (P.DATA_AGE, "A"),
    (P.NEWEST_CALL, "A"),
    (P.REFRESH_DURATION, "A"),
    (P.REFRESH_PHASES, "A"),
    (P.REFRESH_PHASES, "B"),
    (P.REFRESH_PHASES, "C"),
    (P.REFRESH_PHASES, "D"),
}
# Queries that need spend history; tests/test_backfill.py checks them on backfilled data.
HISTORY = {
    (P.EXHAUSTION_HOURS, "A"),
    (P.SPEND_BY_MODEL, "A"),
    (P.SPEND_BY_MODEL, "B"),
    (P.TOKENS_BY_MODEL, "A"),
    (P.TOKENS_BY_MODEL, "B"),
    (P.CACHE_SHARE_BY_PROVIDER, "A"),
    (P.CACHE_SHARE_BY_MODEL, "A"),
    (P.UNPRICED, "A"),
    (P.UNPRICED, "B"),
}


def _per_list_dollar_impact(w: Want) -> Series:
    """Impact of the tasks ranked by list price: ratio x list price, from the reference."""
    ratio = values(w, S + "task_impact_per_list_usd", *TASK)
    listed = values(w, S + "task_list_price_usd", *TASK)
    return {k: ratio[k] * listed[k] for k in ratio}


def _list_avg(w: Want) -> Series:
    listed = values(w, S + "provider_list_price_usd", "provider")
    tasks = values(w, S + "provider_tasks", "provider")
    return {k: v / tasks[k] for k, v in listed.items() if tasks[k] > 0}


# The same queries on the list-price cost basis ($basis = 1).
EXPECTED_LIST: dict[tuple[P, str], tuple[tuple[str, ...], Callable[[Want], Any]]] = {
    (P.TOP_TASKS, "A"): (TASK, lambda w: values(w, S + "task_impact_per_list_usd", *TASK)),
    (P.TOP_TASKS, "B"): (TASK, lambda w: values(w, S + "task_list_price_usd", *TASK)),
    (P.TOP_TASKS, "C"): (TASK, _per_list_dollar_impact),
    (P.PROVIDER_TABLE, "E"): (("provider",), _list_avg),
    (P.PROVIDER_PIE, "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_list_price_usd", "provider"),
    ),
    (P.WASTE_BY_QUEST, "A"): (
        ("quest",),
        lambda w: values(w, S + "wasted_list_price_usd", "quest"),
    ),
}
ALERT_KEY = ("alertname", "alertstate", "quest", "period", "threshold")


def expected_alerts(want: Want) -> Series:
    """The alerts that must be pending a few seconds after Prometheus starts on this ledger.

    No spend while Prometheus watches: every rate is 0, the month's forecast is its spend so
    far, and no quest has the 7 days of history a spend anomaly needs.
    """
    cfg = DEFAULT.mixin
    window = values(want, S + "quest_window_spend_usd", "quest")
    wasted = values(want, S + "wasted_usd", "quest")
    out: Series = {}
    periods = {
        "day": ("quest_spend_today_usd", "budget_allocated_usd"),
        "month": ("quest_spend_month_usd", "budget_allocated_month_usd"),
    }
    levels = (*cfg.budget_warnings, 1.0)
    for period, (spend_name, budget_name) in periods.items():
        spend = values(want, S + spend_name, "quest")
        for (quest,), b in values(want, S + budget_name, "quest").items():
            used = spend.get((quest,), 0.0) / b if b > 0 else 0.0
            if used > 1:
                out[("QuestOverBudget", "pending", quest, period, "")] = 1.0
            for level, upper in pairwise(levels):
                if level <= used <= upper:
                    name = ("QuestBudgetThreshold", "pending", quest, period, f"{level:.0%}")
                    out[name] = 1.0
            if (
                period == "month"
                and b > 0
                and spend.get((quest,), 0.0) > (1 + cfg.forecast_margin) * b
            ):
                out[("QuestMonthForecastOverBudget", "pending", quest, "", "")] = 1.0
    for (quest,), w in wasted.items():
        spent = window.get((quest,), 0.0)
        if spent >= cfg.waste_min_spend_usd and w / spent > cfg.waste_share:
            out[("WasteShareHigh", "pending", quest, "", "")] = 1.0
    return out


EXPECTED[(P.ALERTS, "A")] = (ALERT_KEY, expected_alerts)


@pytest.fixture(scope="module")
def stack(
    pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, Want, datetime]]:
    """A known ledger, the exporter serving it, and Prometheus with a few scrapes of it."""
    with temporary_database(pg_server, schema=True) as dsn:
        yield from _serve_and_scrape(dsn, Path(tmp_path_factory.mktemp("prom")))


def _serve_and_scrape(dsn: str, tmp: Path) -> Iterator[tuple[Prometheus, Want, datetime]]:
    now = datetime.now(UTC)
    calls, impacts, budgets = from_plan(generate.plan(3000, seed=5, end=now))
    # A quest certain to be over today's budget, so an alert is pending during the run.
    calls.append(Call(now, "t-over", quest="q-over", cost_usd=Decimal("5")))
    budgets.append(Budget("q-over", now.date(), Decimal("1")))
    insert(dsn, calls, impacts, budgets)
    midnight = datetime.combine(now.date(), datetime.min.time(), UTC)
    want = expected(calls, impacts, budgets, now, now.date(), midnight)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    assert refresher.refresh(now)
    assert refresher.refresh(now)  # a steady one: the same numbers, and a rendering timed
    server = MetricsServer(refresher, "127.0.0.1", 0).start()
    try:
        with running_prometheus(
            tmp, [f"127.0.0.1:{server.port}"], rule_files=[generator.RULES]
        ) as prom:
            prom.wait_for("count_over_time(scidex_exporter_build_info[1m]) >= 3")
            prom.wait_for('ALERTS{alertname="QuestOverBudget", quest="q-over"}')
            yield prom, want, now
    finally:
        server.stop()
        refresher.close()


def _as_series(result: list[dict[str, Any]], labels: tuple[str, ...]) -> Series:
    out: Series = {}
    for item in result:
        key = tuple(item["metric"].get(label, "") for label in labels)
        assert key not in out, f"two series for {key}"
        out[key] = float(item["value"][1])
    return out


def _check_timely(
    prom: Prometheus, want: Want, now: datetime, panel_id: P, ref: str, expr: str
) -> None:
    """Check the clock-dependent queries against bounds computed from the run."""
    end = time.time()
    if panel_id in (P.DAILY_SPEND_BY_PROVIDER, P.DAILY_SPEND_VS_BUDGET):
        # Ten minutes of today: no whole day yet (A), only today so far (B), the allocation (C).
        result = prom.query_range(expr, end - 600, end, "15s")
        if ref == "A":
            assert result == []
            return
        if ref == "C":
            (series,) = result
            total_budget = total(want, S + "budget_allocated_usd")
            assert float(series["values"][-1][1]) == pytest.approx(total_budget, rel=1e-9)
            return
        families = set(values(want, S + "provider_spend_usd", "provider"))
        assert result
        if panel_id == P.DAILY_SPEND_BY_PROVIDER:
            assert {(s["metric"]["provider"],) for s in result} <= families
        assert all(float(s["values"][-1][1]) == 0 for s in result)  # no spend during the run
        return
    if panel_id == P.REFRESH_PHASES:
        # Which series, and seconds that a refresh of this small ledger can take.
        result = prom.query(expr, at=end)
        queries = {"spend_totals", "newest_call", "budget_today", "window_tasks"}
        label, names = {
            "A": ("query", queries),  # each query's wait for PostgreSQL
            "B": ("query", queries),  # and its Python
            "C": ("source", {"spend", "window", "budget"}),
            "D": ("", {""}),  # rendering
        }[ref]
        assert {s["metric"].get(label, "") for s in result} == names
        assert all(0 <= float(s["value"][1]) < 60 for s in result)
        return
    (sample,) = prom.query(expr, at=end)
    value = float(sample["value"][1])
    if panel_id == P.NEWEST_CALL:
        newest = total(want, S + "ledger_last_call_timestamp_seconds")
        assert value == pytest.approx(end - newest, abs=1.0)
    elif panel_id == P.DATA_AGE:
        assert 0 <= value <= end - now.timestamp() + 1
    else:  # Refresh duration
        assert 0 < value < 60


QUERIES = [(P(p["id"]), t["refId"], t) for p, t in panel_queries(BOARD)]


def test_every_panel_query_is_covered() -> None:
    keys = {(panel_id, ref) for panel_id, ref, _ in QUERIES}
    assert keys == set(EXPECTED) | TIMELY | HISTORY


LIVE = [(t, r, q) for t, r, q in QUERIES if (t, r) not in HISTORY]


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("panel_id", "ref", "target"), LIVE, ids=[f"{t.name}/{r}" for t, r, _ in LIVE]
)
def test_panel_query_shows_the_ledger_numbers(
    stack: tuple[Prometheus, Want, datetime], panel_id: P, ref: str, target: dict[str, Any]
) -> None:
    prom, want, now = stack
    expr = substitute(target["expr"], ALL)
    if (panel_id, ref) in TIMELY:
        _check_timely(prom, want, now, panel_id, ref, expr)
        return
    _check(prom, want, expr, *EXPECTED[(panel_id, ref)])


SWITCHED = [(t, r, q) for t, r, q in QUERIES if f"${grafana.BASIS_VAR}" in q["expr"]]


def test_every_query_on_the_cost_basis_switch_has_list_price_numbers() -> None:
    assert {(t, r) for t, r, _ in SWITCHED} == set(EXPECTED_LIST)


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("panel_id", "ref", "target"), SWITCHED, ids=[f"{t.name}/{r}" for t, r, _ in SWITCHED]
)
def test_panel_query_on_the_list_price_basis(
    stack: tuple[Prometheus, Want, datetime], panel_id: P, ref: str, target: dict[str, Any]
) -> None:
    prom, want, _ = stack
    _check(prom, want, substitute(target["expr"], LIST_BASIS), *EXPECTED_LIST[(panel_id, ref)])


def _check(
    prom: Prometheus, want: Want, expr: str, labels: tuple[str, ...], compute: Callable[[Want], Any]
) -> None:
    result = prom.query(expr)
    assert result, f"no data: {expr}"
    want_value = compute(want)
    if labels:
        got = _as_series(result, labels)
        assert set(got) == set(want_value), expr
        for key, value in want_value.items():
            assert got[key] == pytest.approx(value, rel=1e-9), (key, expr)
    else:
        (sample,) = result
        assert float(sample["value"][1]) == pytest.approx(want_value, rel=1e-9), expr


@pytest.mark.prometheus
def test_pie_slices_add_up_to_the_total_budget(stack: tuple[Prometheus, Want, datetime]) -> None:
    prom, want, _ = stack
    pie = next(p for p in BOARD["panels"] if p["id"] == P.ALLOCATION_PIE)
    slices = [
        float(s["value"][1]) for t in pie["targets"] for s in prom.query(substitute(t["expr"], ALL))
    ]
    assert len(slices) == DEFAULT.mixin.top_quests + 1
    assert sum(slices) == pytest.approx(total(want, S + "budget_allocated_usd"), rel=1e-9)


@pytest.mark.prometheus
def test_filters_narrow_every_quest_panel(stack: tuple[Prometheus, Want, datetime]) -> None:
    prom, want, _ = stack
    quest = max(values(want, S + "budget_allocated_usd", "quest").items(), key=lambda kv: kv[1])[0][
        0
    ]
    panel = next(p for p in BOARD["panels"] if p["id"] == P.BUDGET_TODAY)
    (sample,) = prom.query(substitute(panel["targets"][0]["expr"], {**ALL, "quest": quest}))
    assert float(sample["value"][1]) == pytest.approx(
        values(want, S + "budget_allocated_usd", "quest")[(quest,)], rel=1e-9
    )
    waste = next(p for p in BOARD["panels"] if p["id"] == P.TOP_WASTED_TASKS)
    rows = prom.query(substitute(waste["targets"][0]["expr"], {**ALL, "layer": "Forge"}))
    assert rows and {r["metric"]["layer"] for r in rows} == {"Forge"}
