"""Every panel query, evaluated by a real Prometheus scraping the exporter, against the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from dashboards import __main__ as generator
from dashboards import grafana, resource, rules
from exporter import generate
from exporter.config import load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from tests.conftest import temporary_database
from tests.ledger import Budget, Call, expected, from_plan, insert
from tests.prom import Prometheus, running_prometheus
from tests.promql import panel_queries

BOARD = grafana.render(resource.dashboard())
ALL = dict.fromkeys(grafana.FILTER_LABELS, ".*")

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

# (panel title, refId) -> (labels keying the result, expected value from the reference model).
EXPECTED: dict[tuple[str, str], tuple[tuple[str, ...], Callable[[Want], Any]]] = {
    ("Spend today", "A"): ((), lambda w: total(w, S + "quest_spend_today_usd")),
    ("Budget today", "A"): ((), lambda w: total(w, S + "budget_allocated_usd")),
    ("Budget utilization", "A"): (
        (),
        lambda w: total(w, S + "quest_spend_today_usd") / total(w, S + "budget_allocated_usd"),
    ),
    ("Spend, 30 days", "A"): ((), lambda w: total(w, S + "quest_window_spend_usd")),
    ("Impact per $1", "A"): (
        (),
        lambda w: (
            total(w, S + "quest_window_impact_score") / total(w, S + "quest_window_spend_usd")
        ),
    ),
    ("Wasted, 30 days", "A"): ((), lambda w: total(w, S + "wasted_usd")),
    ("Waste share", "A"): (
        (),
        lambda w: total(w, S + "wasted_usd") / total(w, S + "quest_window_spend_usd"),
    ),
    ("Tokens, 30 days", "A"): ((), lambda w: total(w, S + "provider_tokens")),
    ("Today's allocation by quest", "A"): (
        ("quest",),
        lambda w: top(values(w, S + "budget_allocated_usd", "quest"), resource.TOP_QUESTS),
    ),
    ("Today's allocation by quest", "B"): (
        (),
        lambda w: (
            total(w, S + "budget_allocated_usd")
            - sum(top(values(w, S + "budget_allocated_usd", "quest"), resource.TOP_QUESTS).values())
        ),
    ),
    ("Utilization today by quest", "A"): (
        ("quest",),
        lambda w: values(w, S + "budget_utilization_ratio", "quest"),
    ),
    ("Top tasks by impact per $1", "A"): (
        TASK,
        lambda w: values(w, S + "task_impact_per_usd", *TASK),
    ),
    ("Top tasks by impact per $1", "B"): (TASK, lambda w: values(w, S + "task_cost_usd", *TASK)),
    ("Top tasks by impact per $1", "C"): (
        TASK,
        lambda w: values(w, S + "task_impact_score", *TASK),
    ),
    ("Impact per $1 by quest", "A"): (
        ("quest",),
        lambda w: top(values(w, S + "quest_impact_per_usd", "quest"), 10),
    ),
    ("Providers, last 30 days", "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_spend_usd", "provider"),
    ),
    ("Providers, last 30 days", "B"): (
        ("provider",),
        lambda w: values(w, S + "provider_tasks", "provider"),
    ),
    ("Providers, last 30 days", "C"): (
        ("provider",),
        lambda w: values(w, S + "provider_tokens", "provider"),
    ),
    ("Providers, last 30 days", "D"): (
        ("provider",),
        lambda w: values(w, S + "provider_avg_cost_per_task_usd", "provider"),
    ),
    ("Spend by provider", "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_spend_usd", "provider"),
    ),
    ("Tokens by provider", "A"): (
        ("provider",),
        lambda w: values(w, S + "provider_tokens", "provider"),
    ),
    ("Top wasted tasks", "A"): (TASK, lambda w: values(w, S + "task_wasted_tokens", *TASK)),
    ("Top wasted tasks", "B"): (TASK, lambda w: values(w, S + "task_wasted_usd", *TASK)),
    ("Waste by quest", "A"): (("quest",), lambda w: values(w, S + "wasted_usd", "quest")),
    ("Failed queries", "A"): ((), lambda w: 0.0),
    ("Excluded rows", "A"): ((), lambda w: total(w, S + "ledger_excluded_rows")),
    ("Series exported", "A"): ((), lambda w: float(len(w))),
}
# Queries whose numbers depend on the clock or on history; checked for data and sanity.
TIMELY = {
    ("Daily spend vs budget", "A"),
    ("Daily spend vs budget", "B"),
    ("Daily spend by provider", "A"),
    ("Data age", "A"),
    ("Newest ledger call", "A"),
    ("Refresh duration", "A"),
}
# Queries that need spend history; tests/test_backfill.py checks them on backfilled data.
HISTORY = {("Hours until today's budget runs out", "A")}
ALERT_KEY = ("alertname", "alertstate", "quest")


def expected_alerts(want: Want) -> Series:
    """The alerts that must be pending a few seconds after Prometheus starts on this ledger."""
    cfg = rules.CONFIG
    spend = values(want, S + "quest_spend_today_usd", "quest")
    budget = values(want, S + "budget_allocated_usd", "quest")
    window = values(want, S + "quest_window_spend_usd", "quest")
    wasted = values(want, S + "wasted_usd", "quest")
    out: Series = {}
    for (quest,), b in budget.items():
        if b > 0 and spend.get((quest,), 0.0) > b:
            out[("QuestOverBudget", "pending", quest)] = 1.0
    for (quest,), w in wasted.items():
        spent = window.get((quest,), 0.0)
        if spent >= cfg.waste_min_spend_usd and w / spent > cfg.waste_share:
            out[("WasteShareHigh", "pending", quest)] = 1.0
    return out


EXPECTED[("Firing and pending alerts", "A")] = (ALERT_KEY, expected_alerts)


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
    prom: Prometheus, want: Want, now: datetime, title: str, ref: str, expr: str
) -> None:
    """Check the clock-dependent queries against bounds computed from the run."""
    end = time.time()
    if title == "Daily spend by provider":
        result = prom.query_range(expr, end - 600, end, "15s")
        families = set(values(want, S + "provider_spend_usd", "provider"))
        assert {(s["metric"]["provider"],) for s in result} <= families
        assert all(float(s["values"][-1][1]) == 0 for s in result)  # no spend during the run
        return
    if title == "Daily spend vs budget":
        (series,) = prom.query_range(expr, end - 600, end, "15s")
        last = float(series["values"][-1][1])
        if ref == "B":  # the allocation is constant over the run
            assert last == pytest.approx(total(want, S + "budget_allocated_usd"), rel=1e-9)
        else:  # spend did not move while Prometheus watched
            assert last == 0
        return
    (sample,) = prom.query(expr, at=end)
    value = float(sample["value"][1])
    if title == "Newest ledger call":
        newest = total(want, S + "ledger_last_call_timestamp_seconds")
        assert value == pytest.approx(end - newest, abs=1.0)
    elif title == "Data age":
        assert 0 <= value <= end - now.timestamp() + 1
    else:  # Refresh duration
        assert 0 < value < 60


QUERIES = [(p["title"], t["refId"], t) for p, t in panel_queries(BOARD)]


def test_every_panel_query_is_covered() -> None:
    keys = {(title, ref) for title, ref, _ in QUERIES}
    assert keys == set(EXPECTED) | TIMELY | HISTORY


LIVE = [(t, r, q) for t, r, q in QUERIES if (t, r) not in HISTORY]


@pytest.mark.prometheus
@pytest.mark.parametrize(("title", "ref", "target"), LIVE, ids=[f"{t}/{r}" for t, r, _ in LIVE])
def test_panel_query_shows_the_ledger_numbers(
    stack: tuple[Prometheus, Want, datetime], title: str, ref: str, target: dict
) -> None:
    prom, want, now = stack
    expr = substitute(target["expr"], ALL)
    if (title, ref) in TIMELY:
        _check_timely(prom, want, now, title, ref, expr)
        return
    labels, compute = EXPECTED[(title, ref)]
    result = prom.query(expr)
    assert result, f"{title}/{ref} returned no data: {expr}"
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
    pie = next(p for p in BOARD["panels"] if p["title"] == "Today's allocation by quest")
    slices = [
        float(s["value"][1]) for t in pie["targets"] for s in prom.query(substitute(t["expr"], ALL))
    ]
    assert len(slices) == resource.TOP_QUESTS + 1
    assert sum(slices) == pytest.approx(total(want, S + "budget_allocated_usd"), rel=1e-9)


@pytest.mark.prometheus
def test_filters_narrow_every_quest_panel(stack: tuple[Prometheus, Want, datetime]) -> None:
    prom, want, _ = stack
    quest = max(values(want, S + "budget_allocated_usd", "quest").items(), key=lambda kv: kv[1])[0][
        0
    ]
    panel = next(p for p in BOARD["panels"] if p["title"] == "Budget today")
    (sample,) = prom.query(substitute(panel["targets"][0]["expr"], {**ALL, "quest": quest}))
    assert float(sample["value"][1]) == pytest.approx(
        values(want, S + "budget_allocated_usd", "quest")[(quest,)], rel=1e-9
    )
    waste = next(p for p in BOARD["panels"] if p["title"] == "Top wasted tasks")
    rows = prom.query(substitute(waste["targets"][0]["expr"], {**ALL, "layer": "Forge"}))
    assert rows and {r["metric"]["layer"] for r in rows} == {"Forge"}
