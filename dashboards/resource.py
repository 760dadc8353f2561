"""The Resource Dashboard: where the platform's LLM money and tokens go.

Every query is built from the exporter's metric catalog with :func:`sel`, which adds the
``quest``/``layer``/``provider`` variable filters wherever the metric has that label.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import grafanalib.core as G

from dashboards import grafana as g
from dashboards import rules
from dashboards.config import DASHBOARD_UID, DEFAULT, Config
from dashboards.grafana import by_basis, sel, target
from exporter import catalog as c

TITLE = "Resource Dashboard"


class P(IntEnum):
    """Every panel's id: stable whatever the titles say or the layout adds."""

    OVERVIEW = 1
    SPEND_TODAY = 2
    BUDGET_TODAY = 3
    UTILIZATION = 4
    WINDOW_SPEND = 5
    IMPACT_PER_USD = 6
    WASTED = 7
    WASTE_SHARE = 8
    WINDOW_TOKENS = 9
    ALERTS = 10
    BUDGET_ALLOCATION = 11
    ALLOCATION_PIE = 12
    UTILIZATION_BY_QUEST = 13
    EXHAUSTION_HOURS = 14
    UTILIZATION_TIMELINE = 15
    DAILY_SPEND_VS_BUDGET = 16
    EFFICIENCY = 17
    TOP_TASKS = 18
    QUEST_IMPACT_PER_USD = 19
    PROVIDERS = 20
    PROVIDER_TABLE = 21
    PROVIDER_PIE = 22
    DAILY_SPEND_BY_PROVIDER = 23
    PROVIDER_TOKENS = 24
    WASTE = 25
    TOP_WASTED_TASKS = 26
    WASTE_BY_QUEST = 27
    EXPORTER = 28
    DATA_AGE = 29
    FAILED_QUERIES = 30
    NEWEST_CALL = 31
    REFRESH_DURATION = 32
    EXCLUDED_ROWS = 33
    SERIES = 34
    WINDOW = 35
    GRACE = 36
    MODELS = 37
    SPEND_BY_MODEL = 38
    TOKENS_BY_MODEL = 39
    CACHE_SHARE_BY_PROVIDER = 40
    CACHE_SHARE_BY_MODEL = 41
    UNPRICED = 42
    MONTH_VS_BUDGET = 43
    REFRESH_PHASES = 44


LAYER_COLORS = {
    "Agora": "blue",
    "Exchange": "green",
    "Forge": "orange",
    "Atlas": "purple",
    "Senate": "red",
}
PROVIDER_COLORS = {
    "max": "purple",
    "codex": "green",
    "bedrock": "orange",
    "minimax": "blue",
    "glm": "red",
    c.OTHER: "#8e8e8e",
}

# --- Queries shared by several panels ---------------------------------------------------------
SPEND_TODAY = f"sum({sel(c.QUEST_SPEND_TODAY)})"
BUDGET_TODAY = f"sum({sel(c.BUDGET_ALLOCATED)})"
WINDOW_SPEND = f"sum({sel(c.QUEST_WINDOW_SPEND)})"
WASTED_USD = f"sum({sel(c.WASTED_USD)})"

ALERTS = "ALERTS"
"""Prometheus's own series of firing and pending alerts."""

RED_OVER_BUDGET = g.thresholds((None, "green"), (0.8, "yellow"), (1.0, "red"))


def _provider_overrides() -> list[dict[str, Any]]:
    return [
        g.override(family, color=g.fixed_color(color)) for family, color in PROVIDER_COLORS.items()
    ]


def _colored(column: str, colors: dict[str, str]) -> dict[str, Any]:
    return g.override(column, mappings=g.value_colors(colors), cellOptions={"type": "color-text"})


def _top_allocations(cfg: Config) -> str:
    return f"topk({cfg.mixin.top_quests}, sum by (quest) ({sel(c.BUDGET_ALLOCATED)}))"


def overview(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.OVERVIEW, "Overview")
    panels = [
        (
            P.SPEND_TODAY,
            g.stat(
                "Spend today",
                f"LLM cost since midnight ({cfg.timezone}) of the selected quests.",
                [target(SPEND_TODAY, "spent", instant=True)],
                "currencyUSD",
            ),
        ),
        (
            P.BUDGET_TODAY,
            g.stat(
                "Budget today",
                "Sum of today's allocations of the selected quests.",
                [target(BUDGET_TODAY, "budget", instant=True)],
                "currencyUSD",
            ),
        ),
        (
            P.UTILIZATION,
            g.stat(
                "Budget utilization",
                "Spend today / budget today over the selected quests; red above 100 %.",
                [target(f"{SPEND_TODAY} / {BUDGET_TODAY}", instant=True)],
                "percentunit",
                steps=RED_OVER_BUDGET,
                decimals=1,
            ),
        ),
        (
            P.WINDOW_SPEND,
            g.stat(
                f"Spend, {cfg.window}",
                f"Cost of the tasks active in the last {cfg.window} (each task's cost over all its "
                "calls).",
                [target(WINDOW_SPEND, instant=True)],
                "currencyUSD",
            ),
        ),
        (
            P.IMPACT_PER_USD,
            g.stat(
                "Impact per $1",
                f"Measured impact of the tasks active in the last {cfg.window} "
                "divided by their cost (unmeasured tasks add cost, no impact).",
                [target(f"sum({sel(c.QUEST_WINDOW_IMPACT)}) / {WINDOW_SPEND}", instant=True)],
                "none",
                decimals=2,
            ),
        ),
        (
            P.WASTED,
            g.stat(
                f"Wasted, {cfg.window}",
                f"Cost of tasks with {cfg.waste_rule}.",
                [target(WASTED_USD, instant=True)],
                "currencyUSD",
                steps=g.thresholds((None, "text")),
            ),
        ),
        (
            P.WASTE_SHARE,
            g.stat(
                "Waste share",
                f"Wasted $ / {cfg.settings.window_days}-day spend of the selected quests "
                "(and layers).",
                [target(f"{WASTED_USD} / {WINDOW_SPEND}", instant=True)],
                "percentunit",
                steps=g.thresholds(
                    (None, "green"), (0.1, "yellow"), (cfg.mixin.waste_share, "red")
                ),
                decimals=1,
            ),
        ),
        (
            P.WINDOW_TOKENS,
            g.stat(
                f"Tokens, {cfg.window}",
                f"Input + output tokens of the tasks active in the last {cfg.window}, selected "
                "providers.",
                [target(f"sum({sel(c.PROVIDER_TOKENS)})", instant=True)],
                "short",
            ),
        ),
    ]
    for panel_id, panel in panels:
        layout.add(panel_id, panel, w=3, h=4)


def alerts(layout: g.Layout, cfg: Config) -> None:
    """The alerts table, at the foot of the Overview row."""
    names = "|".join(dict.fromkeys(rules.ALERT_NAMES))
    layout.add(
        P.ALERTS,
        g.table(
            "Firing and pending alerts",
            "The Resource Intelligence alerts Prometheus is evaluating now: firing, or pending "
            "until their 'for' duration passes. Each alert's runbook_url links to docs/runbook.md.",
            [target(f'{ALERTS}{{alertname=~"{names}"}}', table=True)],
            columns={
                "alertname": "Alert",
                "alertstate": "State",
                "severity": "Severity",
                "quest": "Quest",
                "period": "Period",
                "threshold": "Threshold",
                "provider": "Provider",
                "instance": "Instance",
            },
            sort_by="Severity",
            overrides=[
                _colored("State", {"firing": "red", "pending": "orange"}),
                _colored("Severity", {"critical": "red", "warning": "orange"}),
            ],
        ),
        w=24,
        h=6,
    )


def budget_allocation(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.BUDGET_ALLOCATION, "Budget allocation")
    top = _top_allocations(cfg)
    layout.add(
        P.ALLOCATION_PIE,
        g.piechart(
            "Today's allocation by quest",
            f"Today's budget per quest: the {cfg.mixin.top_quests} largest, and Other for the "
            "rest (the slices add up to the total).",
            [
                target(top, "{{quest}}", instant=True),
                target(f"{BUDGET_TODAY} - sum({top})", "Other", instant=True),
            ],
            "currencyUSD",
        ),
        w=8,
        h=10,
    )
    layout.add(
        P.UTILIZATION_BY_QUEST,
        g.bargauge(
            "Utilization today by quest",
            "Spend today / today's allocation per quest; quests without a positive allocation are "
            "not shown.",
            [target(f"sort_desc({sel(c.BUDGET_UTILIZATION)})", "{{quest}}", instant=True)],
            "percentunit",
            steps=RED_OVER_BUDGET,
            min_value=0,
        ),
        w=8,
        h=10,
    )
    layout.add(
        P.EXHAUSTION_HOURS,
        g.bargauge(
            "Hours until today's budget runs out",
            "What is left of today's allocation divided by the last hour's spend rate "
            "(recording rule); quests that spent nothing in the last hour are not shown.",
            [target(f"sort({sel(rules.QUEST_EXHAUSTION_HOURS)})", "{{quest}}", instant=True)],
            "h",
            steps=g.thresholds((None, "red"), (2, "orange"), (6, "green")),
            min_value=0,
        ),
        w=8,
        h=10,
    )


# The daily bars: Grafana aligns a 1-day step to the midnights of the dashboard's timezone (the
# exporter's), and each bar is the day that starts at its midnight (a negative offset looks at
# the day after the step), so the last one is today so far. PromQL sees the end of the query
# only through "@ end()": a day that ends after it is partial, drawn as a series of its own.
_QUERY_END = "max_over_time(timestamp(vector(1))[1m:1s] @ end())"
_PARTIAL = f"on () (vector(time() + 86400) > {_QUERY_END})"
PARTIAL_DAY = "today so far"


def _days(expr: str, legend: str, partial_legend: str) -> list[G.Target]:
    """A daily expression's whole days, and today so far as its own series."""
    return [
        target(f"({expr}) unless {_PARTIAL}", legend, interval="1d"),
        target(f"({expr}) and {_PARTIAL}", partial_legend, interval="1d"),
    ]


def _partial_override(name: str, color: str | None = None) -> dict[str, Any]:
    """Today so far: the colour of its whole days, paler."""
    paler: dict[str, Any] = {"custom.fillOpacity": 20}
    if color is not None:
        paler["color"] = g.fixed_color(color)
    return g.override(name, **paler)


def utilization_timeline(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.UTILIZATION_TIMELINE, "Utilization timeline")
    spend = f"sum(increase({sel(c.SPEND)}[1d] offset -1d))"
    layout.add(
        P.DAILY_SPEND_VS_BUDGET,
        g.timeseries(
            "Daily spend vs budget",
            f"Bars: cost per day of the {cfg.timezone} calendar (the spend counter's increase "
            "over the day that starts at the bar); the last bar, paler, is today so far. Line: "
            "the day's total allocation.",
            [
                *_days(spend, "spend", PARTIAL_DAY),
                target(
                    f"sum(last_over_time({sel(c.BUDGET_ALLOCATED)}[1d] offset -86399s))",
                    "budget",
                    interval="1d",
                ),
            ],
            "currencyUSD",
            bars=True,
            overrides=[
                g.override(
                    "budget",
                    **{
                        "custom.drawStyle": "line",
                        "custom.fillOpacity": 0,
                        "color": g.fixed_color("red"),
                    },
                ),
                _partial_override(PARTIAL_DAY),
            ],
        ),
        w=14,
        h=9,
    )
    layout.add(
        P.MONTH_VS_BUDGET,
        g.timeseries(
            "Month to date vs budget, and forecast",
            f"This month ({cfg.timezone} calendar): spend since the 1st, the allocations from "
            "the 1st to today, the whole month's allocation (days ahead included), and the "
            "forecast of the month's spend at the last 7 days' pace (recording rule).",
            [
                target(f"sum({sel(rules.QUEST_SPEND_MONTH)})", "spend"),
                target(f"sum({sel(rules.QUEST_BUDGET_MONTH_TO_DATE)})", "budget to date"),
                target(f"sum({sel(rules.QUEST_BUDGET_MONTH)})", "month's budget"),
                target(f"sum({sel(rules.QUEST_MONTH_FORECAST)})", "forecast"),
            ],
            "currencyUSD",
            overrides=[
                g.override("month's budget", color=g.fixed_color("red")),
                g.override("forecast", **{"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}),
            ],
        ),
        w=10,
        h=9,
    )


def efficiency(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.EFFICIENCY, "Efficiency rankings")
    layout.add(
        P.TOP_TASKS,
        g.table(
            "Top tasks by impact per $1",
            f"Tasks active in the last {cfg.window} with cost > 0 and impact > 0, by impact / "
            f"cost (top {cfg.settings.top_efficiency_tasks}, ties by task id). Cost basis "
            "'list price': the same ranking by what the calls are worth at list price, so "
            "subscription tasks (logged at $0) are ranked too.",
            [
                target(
                    by_basis(sel(c.TASK_IMPACT_PER_USD), sel(c.TASK_IMPACT_PER_LIST_USD)),
                    table=True,
                ),
                target(by_basis(sel(c.TASK_COST), sel(c.TASK_LIST_PRICE)), table=True),
                target(
                    by_basis(
                        sel(c.TASK_IMPACT),
                        f"{sel(c.TASK_IMPACT_PER_LIST_USD)} * {sel(c.TASK_LIST_PRICE)}",
                    ),
                    table=True,
                ),
            ],
            columns={
                "task_id": "Task",
                "quest": "Quest",
                "layer": "Layer",
                "Value #A": "Impact per $1",
                "Value #B": "Cost",
                "Value #C": "Impact",
            },
            sort_by="Impact per $1",
            overrides=[
                g.override("Impact per $1", unit="none", decimals=2),
                g.override("Cost", unit="currencyUSD"),
                g.override("Impact", unit="none", decimals=2),
                _colored("Layer", LAYER_COLORS),
            ],
        ),
        w=16,
        h=10,
    )
    layout.add(
        P.QUEST_IMPACT_PER_USD,
        g.bargauge(
            "Impact per $1 by quest",
            f"Measured impact / cost of each quest's tasks active in the last {cfg.window} "
            "(top 10).",
            [target(f"topk(10, {sel(c.QUEST_IMPACT_PER_USD)})", "{{quest}}", instant=True)],
            "none",
            color={"mode": "continuous-GrYlRd"},
        ),
        w=8,
        h=10,
    )


def providers(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.PROVIDERS, "Provider breakdown")
    spend = by_basis(sel(c.PROVIDER_SPEND), sel(c.PROVIDER_LIST_PRICE))
    layout.add(
        P.PROVIDER_TABLE,
        g.table(
            f"Providers, last {cfg.window}",
            "Per provider family, over the tasks active in the last "
            f"{cfg.window}: what was billed, what the same calls are worth at list price "
            "(subscription families bill $0), tasks that called it, tokens, and cost per task "
            "(on the cost basis chosen).",
            [
                target(sel(c.PROVIDER_SPEND), table=True),
                target(sel(c.PROVIDER_LIST_PRICE), table=True),
                target(sel(c.PROVIDER_TASKS), table=True),
                target(sel(c.PROVIDER_TOKENS), table=True),
                target(
                    by_basis(
                        sel(c.PROVIDER_AVG_COST),
                        f"{sel(c.PROVIDER_LIST_PRICE)} / ({sel(c.PROVIDER_TASKS)} > 0)",
                    ),
                    table=True,
                ),
            ],
            columns={
                "provider": "Provider",
                "Value #A": "Billed",
                "Value #B": "List price",
                "Value #C": "Tasks",
                "Value #D": "Tokens",
                "Value #E": "Avg cost / task",
            },
            sort_by="List price",
            overrides=[
                g.override("Billed", unit="currencyUSD"),
                g.override("List price", unit="currencyUSD"),
                g.override("Tasks", unit="short"),
                g.override("Tokens", unit="short"),
                g.override("Avg cost / task", unit="currencyUSD"),
                _colored("Provider", PROVIDER_COLORS),
            ],
        ),
        w=12,
        h=8,
    )
    layout.add(
        P.PROVIDER_PIE,
        g.piechart(
            "Spend by provider",
            f"Cost of the tasks active in the last {cfg.window}, by provider family, on the cost "
            "basis chosen (billed: subscription families max and codex log $0).",
            [target(f"sum by (provider) ({spend})", "{{provider}}", instant=True)],
            "currencyUSD",
            overrides=_provider_overrides(),
        ),
        w=6,
        h=8,
    )
    layout.add(
        P.PROVIDER_TOKENS,
        g.bargauge(
            "Tokens by provider",
            f"Input + output tokens of the tasks active in the last {cfg.window}, by provider "
            "family.",
            [
                target(
                    f"sort_desc(sum by (provider) ({sel(c.PROVIDER_TOKENS)}))",
                    "{{provider}}",
                    instant=True,
                )
            ],
            "short",
            overrides=_provider_overrides(),
            color={"mode": "palette-classic"},
        ),
        w=6,
        h=8,
    )
    layout.add(
        P.DAILY_SPEND_BY_PROVIDER,
        g.timeseries(
            "Daily spend by provider",
            f"Cost per day of the {cfg.timezone} calendar by provider family (the spend "
            "counter's increase over the day that starts at the bar); the last bars, paler, "
            "are today so far.",
            _days(
                f"sum by (provider) (increase({sel(c.SPEND)}[1d] offset -1d))",
                "{{provider}}",
                f"{{{{provider}}}} ({PARTIAL_DAY})",
            ),
            "currencyUSD",
            bars=True,
            overrides=[
                *_provider_overrides(),
                *(
                    _partial_override(f"{family} ({PARTIAL_DAY})", color)
                    for family, color in PROVIDER_COLORS.items()
                ),
            ],
        ),
        w=24,
        h=8,
    )


def _day(metric: c.MetricSpec, by: str, **matchers: str) -> str:
    """A counter's increase over the last 24 hours, summed by a label."""
    return f"sum by ({by}) (increase({sel(metric, **matchers)}[1d]))"


def _top_models(metric: c.MetricSpec) -> tuple[str, str]:
    """The 10 largest models of a counter's last 24 hours, and the rest as one sum."""
    by_model = _day(metric, "model")
    top = f"topk(10, {by_model})"
    return f"sort_desc({top})", f"sum({by_model}) - sum({top})"


def models(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.MODELS, "Models and prompt cache")
    spend, spend_rest = _top_models(c.MODEL_SPEND)
    tokens, tokens_rest = _top_models(c.MODEL_TOKENS)
    layout.add(
        P.SPEND_BY_MODEL,
        g.bargauge(
            "Spend by model, last 24 h",
            "Billed cost of the last 24 hours by model, selected providers: the 10 largest and "
            "the rest (models beyond the exporter's max_models are already one 'other').",
            [target(spend, "{{model}}", instant=True), target(spend_rest, "rest", instant=True)],
            "currencyUSD",
            color={"mode": "palette-classic"},
        ),
        w=8,
        h=9,
    )
    layout.add(
        P.TOKENS_BY_MODEL,
        g.bargauge(
            "Tokens by model, last 24 h",
            "Tokens of every kind (fresh input, cache reads and writes, output) of the last 24 "
            "hours by model: the 10 largest and the rest.",
            [target(tokens, "{{model}}", instant=True), target(tokens_rest, "rest", instant=True)],
            "short",
            color={"mode": "palette-classic"},
        ),
        w=8,
        h=9,
    )

    def share(metric: c.MetricSpec, by: str) -> tuple[str, str]:
        """Cache reads, and fresh input + cache reads, of a token counter summed by a label."""
        read = _day(metric, by, direction="cache_read")
        return read, f"({read} + {_day(metric, by, direction='input')})"

    cache_read, all_input = share(c.TOKENS, "provider")
    layout.add(
        P.CACHE_SHARE_BY_PROVIDER,
        g.bargauge(
            "Cache-read share of input by provider, last 24 h",
            "Input served from the prompt cache / (fresh input + cache reads). "
            "Cache reads cost about a tenth of fresh input: the biggest cost lever of agents.",
            [
                target(
                    f"sort_desc({cache_read} / ({all_input} > 0))",
                    "{{provider}}",
                    instant=True,
                )
            ],
            "percentunit",
            min_value=0,
            max_value=1,
            overrides=_provider_overrides(),
            color={"mode": "palette-classic"},
        ),
        w=8,
        h=9,
    )
    model_read, model_input = share(c.MODEL_TOKENS, "model")
    layout.add(
        P.CACHE_SHARE_BY_MODEL,
        g.bargauge(
            "Cache-read share of input by model, last 24 h",
            "The same share for the 10 models with the most input (fresh + cache reads).",
            [
                target(
                    f"sort_desc({model_read} / (topk(10, {model_input}) > 0))",
                    "{{model}}",
                    instant=True,
                )
            ],
            "percentunit",
            min_value=0,
            max_value=1,
            color={"mode": "palette-classic"},
        ),
        w=12,
        h=8,
    )
    layout.add(
        P.UNPRICED,
        g.table(
            "Calls without a list price, last 24 h",
            "Calls whose model has no price in the catalogue nor in the 'prices' setting: they "
            "add nothing to list prices (never guessed). Add a price to count them.",
            [
                target(f"sort_desc({_day(c.UNPRICED_CALLS, 'provider, model')})", table=True),
                target(_day(c.UNPRICED_TOKENS, "provider, model"), table=True),
            ],
            columns={
                "provider": "Provider",
                "model": "Model",
                "Value #A": "Calls",
                "Value #B": "Tokens",
            },
            sort_by="Calls",
            overrides=[
                g.override("Calls", unit="short"),
                g.override("Tokens", unit="short"),
                _colored("Provider", PROVIDER_COLORS),
            ],
        ),
        w=12,
        h=8,
    )


def waste(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.WASTE, "Wasted resources")
    wasted = by_basis(sel(c.WASTED_USD), sel(c.WASTED_LIST_PRICE))
    layout.add(
        P.TOP_WASTED_TASKS,
        g.table(
            "Top wasted tasks",
            f"Tasks with {cfg.waste_rule} (top {cfg.settings.top_waste_tasks} by tokens).",
            [
                target(sel(c.TASK_WASTED_TOKENS), table=True),
                target(sel(c.TASK_WASTED_USD), table=True),
            ],
            columns={
                "task_id": "Task",
                "quest": "Quest",
                "layer": "Layer",
                "Value #A": "Tokens",
                "Value #B": "Cost",
            },
            sort_by="Tokens",
            overrides=[
                g.override("Tokens", unit="short"),
                g.override("Cost", unit="currencyUSD"),
                _colored("Layer", LAYER_COLORS),
            ],
        ),
        w=14,
        h=10,
    )
    layout.add(
        P.WASTE_BY_QUEST,
        g.bargauge(
            "Waste by quest",
            f"Cost of all wasted tasks per quest over the last {cfg.window}, on the cost basis "
            "chosen (list price: subscription waste is priced).",
            [
                target(
                    f"sort_desc(sum by (quest) ({wasted}))",
                    "{{quest}}",
                    instant=True,
                )
            ],
            "currencyUSD",
            color={"mode": "continuous-YlRd"},
        ),
        w=10,
        h=10,
    )


def exporter_health(layout: g.Layout, cfg: Config) -> None:
    layout.row(P.EXPORTER, "Exporter")
    stale = g.thresholds((None, "green"), (120, "yellow"), (600, "red"))
    panels = [
        g.stat(
            "Data age",
            "Seconds since the exporter last read every query successfully.",
            [target(f"time() - max({c.LAST_SUCCESS.name})", instant=True)],
            "s",
            steps=stale,
        ),
        g.stat(
            "Failed queries",
            "Exporter queries that failed in the last refresh.",
            [target(f"count({c.QUERY_SUCCESS.name} == 0) or vector(0)", instant=True)],
            "short",
            steps=g.thresholds((None, "green"), (1, "red")),
        ),
        g.stat(
            "Newest ledger call",
            "Seconds since the newest valid cost_ledger row: a stalled platform shows here.",
            [target(f"time() - max({c.LEDGER_LAST_CALL.name})", instant=True)],
            "s",
            steps=g.thresholds((None, "green"), (3600, "yellow"), (6 * 3600, "red")),
        ),
        g.stat(
            "Refresh duration",
            "Duration of the exporter's last refresh, all queries.",
            [target(f"max({c.REFRESH_DURATION.name})", instant=True)],
            "s",
        ),
        g.stat(
            "Excluded rows",
            "Ledger rows left out of every sum (NULL/NaN/negative cost, "
            "bad tokens, bad allocations).",
            [target(f"sum({c.LEDGER_EXCLUDED_ROWS.name})", instant=True)],
            "short",
            steps=g.thresholds((None, "green"), (1, "yellow")),
        ),
        g.stat(
            "Series exported",
            "Ledger series in the exporter's last exposition.",
            [target(f"sum({c.SERIES.name})", instant=True)],
            "short",
        ),
        g.stat(
            "Window",
            "The window of the rankings, provider and waste views, as the exporter is "
            "configured (window_days).",
            [target(f"max({c.WINDOW.name}) / 86400", instant=True)],
            "d",
        ),
        g.stat(
            "Waste grace period",
            "How long a task must be idle before it can count as waste, as the exporter is "
            "configured (grace_hours).",
            [target(f"max({c.GRACE.name}) / 3600", instant=True)],
            "h",
        ),
    ]
    ids = (
        P.DATA_AGE,
        P.FAILED_QUERIES,
        P.NEWEST_CALL,
        P.REFRESH_DURATION,
        P.EXCLUDED_ROWS,
        P.SERIES,
        P.WINDOW,
        P.GRACE,
    )
    for panel_id, panel in zip(ids, panels, strict=True):
        layout.add(panel_id, panel, w=3, h=4)
    duration, database = c.QUERY_DURATION.name, c.QUERY_DATABASE.name
    phases = g.timeseries(
        "Where a refresh spends its time",
        "Each query's wait for PostgreSQL and the exporter's Python folding its rows in, each "
        "source building its families, and rendering the exposition (that of the refresh "
        "before). A slow refresh shows which part grew.",
        [
            target(f"max by (query) ({database})", "{{query}}: database"),
            target(f"max by (query) ({duration} - {database})", "{{query}}: Python"),
            target(f"max by (source) ({c.BUILD_DURATION.name})", "{{source}}: families"),
            target(f"max({c.RENDER_DURATION.name})", "rendering"),
        ],
        "s",
    )
    layout.add(P.REFRESH_PHASES, phases, w=24, h=8)


SECTIONS = (
    overview,
    alerts,
    budget_allocation,
    utilization_timeline,
    efficiency,
    providers,
    models,
    waste,
    exporter_health,
)


def dashboard(cfg: Config = DEFAULT) -> G.Dashboard:
    """Build the Resource Dashboard for a configuration."""
    layout = g.Layout()
    for section in SECTIONS:
        section(layout, cfg)
    return G.Dashboard(
        title=TITLE,
        uid=DASHBOARD_UID,
        description="Where SciDEX's LLM money and tokens go: budgets, efficiency, providers "
        "and waste.",
        tags=["scidex", "resource-intelligence"],
        timezone="utc" if cfg.timezone == "UTC" else cfg.timezone,
        time=G.Time(f"now-{cfg.window_range}", "now"),
        refresh="1m",
        panels=layout.panels,
        templating=G.Templating(
            list=[
                g.datasource_variable(),
                g.basis_variable(),
                g.query_variable("quest", "Quest", c.SPEND),
                g.query_variable("layer", "Layer", c.SPEND),
                g.query_variable("provider", "Provider", c.PROVIDER_SPEND),
            ]
        ),
    )
