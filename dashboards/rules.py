"""Prometheus recording rules and alerts, generated from the exporter's metric catalog.

Every selector, threshold and window comes from one :class:`~dashboards.config.Config` (as
kubernetes-mixin's config does); recording-rule names follow ``level:metric:operation`` and
are constants the dashboard imports.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from dashboards.config import DEFAULT, Config
from exporter import catalog as c

# --- Recorded series (the dashboard and the alerts use these names) --------------------------


def _rec(name: str, help: str, label: str, unit: str) -> c.MetricSpec:
    return c.MetricSpec(name, "gauge", help, (label,), unit)


QUEST_SPEND_RATE = {
    w: _rec(
        f"quest:scidex_spend_usd:rate{w}", f"Spend rate over {w}, USD/s.", "quest", "currencyUSD"
    )
    for w in ("5m", "30m", "1h", "6h")
}
QUEST_BURN_RATE = {
    w: _rec(
        f"quest:scidex_budget_burn_rate:rate{w}",
        f"Spend rate over {w} / (daily allocation / 24 h).",
        "quest",
        "none",
    )
    for w in QUEST_SPEND_RATE
}
QUEST_BUDGET = _rec(
    "quest:scidex_budget_allocated_usd:sum", "Today's allocation.", "quest", "currencyUSD"
)
QUEST_SPEND_TODAY = _rec(
    "quest:scidex_quest_spend_today_usd:sum", "Spend today.", "quest", "currencyUSD"
)
QUEST_EXHAUSTION_HOURS = _rec(
    "quest:scidex_budget_exhaustion_hours:rate1h",
    "Hours until today's allocation is spent at the last hour's pace.",
    "quest",
    "h",
)
QUEST_WASTE_SHARE = _rec(
    "quest:scidex_waste_share:ratio", "Wasted $ / window spend.", "quest", "percentunit"
)
QUEST_WINDOW_SPEND = _rec(
    "quest:scidex_quest_window_spend_usd:sum", "Window spend.", "quest", "currencyUSD"
)
QUEST_DAILY_SPEND = _rec(
    "quest:scidex_spend_usd:increase1d", "Spend over the last 24 hours.", "quest", "currencyUSD"
)
QUEST_SPEND_RATE_7D = _rec(
    "quest:scidex_spend_usd:rate7d", "Spend rate over 7 days, USD/s.", "quest", "currencyUSD"
)
QUEST_SPEND_BASELINE = _rec(
    "quest:scidex_spend_usd:rate1h_baseline7d",
    "Mean of the 1-hour spend rate at this time of day over the last 7 days, USD/s.",
    "quest",
    "currencyUSD",
)
QUEST_SPEND_MONTH = _rec(
    "quest:scidex_quest_spend_month_usd:sum", "Spend this month.", "quest", "currencyUSD"
)
QUEST_BUDGET_MONTH = _rec(
    "quest:scidex_budget_allocated_month_usd:sum",
    "This month's allocation, days ahead included.",
    "quest",
    "currencyUSD",
)
QUEST_BUDGET_MONTH_TO_DATE = _rec(
    "quest:scidex_budget_allocated_month_to_date_usd:sum",
    "This month's allocation up to today inclusive.",
    "quest",
    "currencyUSD",
)
QUEST_MONTH_FORECAST = _rec(
    "quest:scidex_quest_spend_month_usd:forecast",
    "Spend this month so far plus the last 7 days' rate until the month's end.",
    "quest",
    "currencyUSD",
)
# One series per quest and period (day, month): the budget alerts read both alike.
QUEST_PERIOD_SPEND = c.MetricSpec(
    "quest:scidex_period_spend_usd:sum",
    "gauge",
    "Spend in the current period (day or month).",
    ("quest", "period"),
    "currencyUSD",
)
QUEST_PERIOD_BUDGET = c.MetricSpec(
    "quest:scidex_period_budget_usd:sum",
    "gauge",
    "Allocation of the current period (day, or the whole month).",
    ("quest", "period"),
    "currencyUSD",
)
QUEST_BUDGET_USED = c.MetricSpec(
    "quest:scidex_budget_used:ratio",
    "gauge",
    "Spend / allocation of the current period (day or month), where the allocation is > 0.",
    ("quest", "period"),
    "percentunit",
)
PERIODS = ("day", "month")

PROVIDER_SPEND_RATE = {
    w: _rec(
        f"provider:scidex_spend_usd:rate{w}",
        f"Provider family spend rate over {w}, USD/s.",
        "provider",
        "currencyUSD",
    )
    for w in ("1h", "3h", "7d")
}

RECORDED_METRICS: tuple[c.MetricSpec, ...] = (
    *QUEST_SPEND_RATE.values(),
    *QUEST_BURN_RATE.values(),
    QUEST_BUDGET,
    QUEST_SPEND_TODAY,
    QUEST_EXHAUSTION_HOURS,
    QUEST_WASTE_SHARE,
    QUEST_WINDOW_SPEND,
    QUEST_DAILY_SPEND,
    QUEST_SPEND_RATE_7D,
    QUEST_SPEND_BASELINE,
    QUEST_SPEND_MONTH,
    QUEST_BUDGET_MONTH,
    QUEST_BUDGET_MONTH_TO_DATE,
    QUEST_MONTH_FORECAST,
    QUEST_PERIOD_SPEND,
    QUEST_PERIOD_BUDGET,
    QUEST_BUDGET_USED,
    *PROVIDER_SPEND_RATE.values(),
)
RECORDED = frozenset(m.name for m in RECORDED_METRICS)

ALERT_NAMES = (
    "QuestOverBudget",
    "QuestBudgetThreshold",
    "QuestMonthForecastOverBudget",
    "QuestSpendAnomaly",
    "QuestBudgetBurnRate",
    "WasteShareHigh",
    "ProviderSpendSpike",
    "ResourceExporterDown",
    "ResourceExporterStale",
)


def _record(metric: c.MetricSpec, expr: str, **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": metric.name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def recording_rules(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """Rules evaluated every interval: cheap aggregations over the latest samples."""
    j = cfg.sel
    rules = [
        _record(QUEST_BUDGET, f"sum by (quest) ({c.BUDGET_ALLOCATED}{{{j}}})"),
        _record(QUEST_SPEND_TODAY, f"sum by (quest) ({c.QUEST_SPEND_TODAY}{{{j}}})"),
        _record(QUEST_WINDOW_SPEND, f"sum by (quest) ({c.QUEST_WINDOW_SPEND}{{{j}}})"),
        _record(QUEST_SPEND_MONTH, f"sum by (quest) ({c.QUEST_SPEND_MONTH}{{{j}}})"),
        _record(QUEST_BUDGET_MONTH, f"sum by (quest) ({c.BUDGET_ALLOCATED_MONTH}{{{j}}})"),
        _record(
            QUEST_BUDGET_MONTH_TO_DATE,
            f"sum by (quest) ({c.BUDGET_ALLOCATED_MONTH_TO_DATE}{{{j}}})",
        ),
        _record(QUEST_PERIOD_SPEND, QUEST_SPEND_TODAY.name, period="day"),
        _record(QUEST_PERIOD_SPEND, QUEST_SPEND_MONTH.name, period="month"),
        _record(QUEST_PERIOD_BUDGET, QUEST_BUDGET.name, period="day"),
        _record(QUEST_PERIOD_BUDGET, QUEST_BUDGET_MONTH.name, period="month"),
        _record(
            QUEST_BUDGET_USED,
            f"{QUEST_PERIOD_SPEND} / on (quest, period) ({QUEST_PERIOD_BUDGET} > 0)",
        ),
        _record(
            QUEST_WASTE_SHARE,
            f"sum by (quest) ({c.WASTED_USD}{{{j}}}) / ({QUEST_WINDOW_SPEND} > 0)",
        ),
    ]
    for window, name in QUEST_SPEND_RATE.items():
        rules.append(_record(name, f"sum by (quest) (rate({c.SPEND}{{{j}}}[{window}]))"))
    for window, name in QUEST_BURN_RATE.items():
        # USD/s * 86400 s/day / (USD/day): the multiple of the sustainable daily pace.
        rules.append(_record(name, f"{QUEST_SPEND_RATE[window]} * 86400 / ({QUEST_BUDGET} > 0)"))
    rules.append(
        _record(
            QUEST_EXHAUSTION_HOURS,
            f"clamp_min({QUEST_BUDGET} - {QUEST_SPEND_TODAY}, 0)"
            f" / ({QUEST_SPEND_RATE['1h']} * 3600 > 0)",
        )
    )
    rules.append(
        _record(PROVIDER_SPEND_RATE["1h"], f"sum by (provider) (rate({c.SPEND}{{{j}}}[1h]))")
    )
    # The same hour of each of the last 7 days: absent until a quest has 7 days of history.
    hour = QUEST_SPEND_RATE["1h"]
    days = " + ".join(f"{hour} offset {d}d" for d in range(1, 8))
    rules.append(_record(QUEST_SPEND_BASELINE, f"({days}) / 7"))
    return rules


def slow_recording_rules(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """Long windows, evaluated every 5 minutes: they change slowly and read many samples."""
    j = cfg.sel
    # Read from the exporter, not from the other group's recorded series (one evaluation old).
    spend_month = f"sum by (quest) ({c.QUEST_SPEND_MONTH}{{{j}}})"
    return [
        _record(QUEST_DAILY_SPEND, f"sum by (quest) (increase({c.SPEND}{{{j}}}[1d]))"),
        _record(QUEST_SPEND_RATE_7D, f"sum by (quest) (rate({c.SPEND}{{{j}}}[7d]))"),
        # Why a rule and the last 7 days' pace: the month so far says little on its first days,
        # 7 days hold each weekday once. The month's end comes from the exporter, which knows
        # the configured timezone (PromQL's calendar functions are UTC).
        _record(
            QUEST_MONTH_FORECAST,
            f"{spend_month} + on (quest) ({QUEST_SPEND_RATE_7D} or on (quest) 0 * {spend_month})"
            f" * scalar(clamp_min(max({c.BUDGET_MONTH_END}{{{j}}}) - time(), 0))",
        ),
        *(
            _record(PROVIDER_SPEND_RATE[w], f"sum by (provider) (rate({c.SPEND}{{{j}}}[{w}]))")
            for w in ("3h", "7d")
        ),
    ]


def _alert(
    cfg: Config,
    name: str,
    expr: str,
    duration: str,
    severity: str,
    summary: str,
    description: str,
    link: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An alert; ``link`` is the label (quest, provider) its dashboard link selects."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if duration != "0s":
        rule["for"] = duration
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": cfg.runbook(name),
        "dashboard_url": cfg.dashboard_link(link),
    }
    return rule


def _query_value(expr: str, *labels: str, fmt: str = "humanize") -> str:
    """A template snippet printing the first value of ``expr``, whose ``%q`` are the labels.

    ``%q`` quotes each value as a Go string literal, which PromQL reads back unchanged: a
    quest name with a quote or a backslash selects its own series.
    """
    args = " ".join(f"$labels.{label}" for label in labels or ("quest",))
    return (
        f"{{{{ with printf `{expr}` {args} | query }}}}"
        f"{{{{ . | first | value | {fmt} }}}}{{{{ end }}}}"
    )


# "today" or "this month", from the period label of the budget alerts.
_PERIOD = '{{ if eq $labels.period "day" }}today{{ else }}this month{{ end }}'


def _budget_alerts(cfg: Config) -> list[dict[str, Any]]:
    """Over budget (critical) and the warnings before it, for today and for this month."""
    m = cfg.mixin
    of_period = "{quest=%q,period=%q}"
    spent = _query_value(f"{QUEST_PERIOD_SPEND}{of_period}", "quest", "period")
    budget = _query_value(f"{QUEST_PERIOD_BUDGET}{of_period}", "quest", "period")
    out = [
        _alert(
            cfg,
            "QuestOverBudget",
            f"{QUEST_BUDGET_USED} > 1",
            m.over_budget_for,
            "critical",
            f"Quest {{{{ $labels.quest }}}} is over its budget for {_PERIOD}.",
            f"Quest {{{{ $labels.quest }}}} has spent ${spent} {_PERIOD}, more than its "
            f"allocation of ${budget} ({{{{ $value | humanizePercentage }}}}).",
            link="quest",
        )
    ]
    # One band per level, up to the next: a quest at 95 % has the 90 % warning only.
    levels = (*m.budget_warnings, 1.0)
    for level, upper in pairwise(levels):
        out.append(
            _alert(
                cfg,
                "QuestBudgetThreshold",
                f"{QUEST_BUDGET_USED} >= {level:g} <= {upper:g}",
                m.over_budget_for,
                "warning",
                f"Quest {{{{ $labels.quest }}}} has used {{{{ $value | humanizePercentage }}}}"
                f" of its budget for {_PERIOD}.",
                f"Quest {{{{ $labels.quest }}}} has spent ${spent} of its ${budget} for "
                f"{_PERIOD} ({{{{ $value | humanizePercentage }}}}; warning from {level:.0%}).",
                link="quest",
                labels={"threshold": f"{level:.0%}"},
            )
        )
    return out


def alerts(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """The alerts: budget overspend and burn, waste, provider spikes, exporter health."""
    j = cfg.sel
    m = cfg.mixin
    budget_of = _query_value(f"{QUEST_BUDGET}{{quest=%q}}")
    fast, slow = m.fast_burn, m.slow_burn
    big_enough = f"on (quest) ({QUEST_BUDGET} >= {m.min_allocation_usd:g})"
    burn = QUEST_BURN_RATE
    hourly = f"{QUEST_SPEND_RATE['1h']} * 3600"
    baseline = f"{QUEST_SPEND_BASELINE} * 3600"
    return [
        *_budget_alerts(cfg),
        _alert(
            cfg,
            "QuestMonthForecastOverBudget",
            f"{QUEST_MONTH_FORECAST} > on (quest) {1 + m.forecast_margin:g}"
            f" * (sum by (quest) ({c.BUDGET_ALLOCATED_MONTH}{{{j}}}) > 0)",
            m.forecast_for,
            "warning",
            "Quest {{ $labels.quest }} is on course to overspend this month's budget.",
            "At the last 7 days' pace quest {{ $labels.quest }} will have spent "
            "${{ $value | humanize }} by the end of the month, more than its month's "
            f"allocation of ${_query_value(f'{QUEST_BUDGET_MONTH}{{quest=%q}}')} by over "
            f"{m.forecast_margin:.0%}; it has spent "
            f"${_query_value(f'{QUEST_SPEND_MONTH}{{quest=%q}}')} so far.",
            link="quest",
        ),
        _alert(
            cfg,
            "QuestSpendAnomaly",
            f"{hourly} > {m.anomaly_factor:g} * {baseline}"
            f" and {hourly} - {baseline} > {m.anomaly_min_usd_per_hour:g}",
            "15m",
            "warning",
            "Quest {{ $labels.quest }} spends far more than usual at this hour.",
            "Quest {{ $labels.quest }} has spent at ${{ $value | humanize }}/h over the last "
            f"hour, more than {m.anomaly_factor:g}x its mean of "
            f"${_query_value(f'{QUEST_SPEND_BASELINE}{{quest=%q}} * 3600')}/h at this hour "
            "of the last 7 days.",
            link="quest",
        ),
        _alert(
            cfg,
            "QuestBudgetBurnRate",
            f"{burn['1h']} > {fast:g} and {burn['5m']} > {fast:g} and {big_enough}",
            "2m",
            "critical",
            "Quest {{ $labels.quest }} will exhaust today's budget within hours.",
            "Quest {{ $labels.quest }} has spent at {{ $value | humanize }}x its sustainable "
            f"daily pace over the last hour and 5 minutes (threshold {fast:g}x); at the last "
            f"hour's pace what is left of today's ${budget_of} lasts "
            + _query_value(f"{QUEST_EXHAUSTION_HOURS}{{quest=%q}}", fmt='printf "%.1f"')
            + " more hours.",
            link="quest",
        ),
        _alert(
            cfg,
            "QuestBudgetBurnRate",
            f"{burn['6h']} > {slow:g} and {burn['30m']} > {slow:g} and {big_enough}",
            "15m",
            "warning",
            "Quest {{ $labels.quest }} is spending faster than its budget allows.",
            "Quest {{ $labels.quest }} has spent at {{ $value | humanize }}x its sustainable "
            f"daily pace over the last 6 hours and 30 minutes (threshold {slow:g}x); its "
            f"daily allocation is ${budget_of}.",
            link="quest",
        ),
        _alert(
            cfg,
            "WasteShareHigh",
            f"{QUEST_WASTE_SHARE} > {m.waste_share:g}"
            f" and on (quest) ({QUEST_WINDOW_SPEND} >= {m.waste_min_spend_usd:g})",
            "1h",
            "warning",
            "Quest {{ $labels.quest }} wastes {{ $value | humanizePercentage }} of its spend.",
            f"{{{{ $value | humanizePercentage }}}} of the last {cfg.window}' spend of quest "
            "{{ $labels.quest }} ($"
            + _query_value(f"{QUEST_WINDOW_SPEND}{{quest=%q}}")
            + f") went to tasks that used over {cfg.settings.waste_min_tokens} tokens and "
            f"produced impact <= {cfg.settings.waste_max_impact:g} or none "
            f"(threshold {m.waste_share:.0%}).",
            link="quest",
        ),
        _alert(
            cfg,
            "ProviderSpendSpike",
            f"{PROVIDER_SPEND_RATE['3h']} * 3600 > {m.provider_spike_factor:g} * "
            f"{PROVIDER_SPEND_RATE['7d']} * 3600"
            f" and {PROVIDER_SPEND_RATE['3h']} * 3600 > {m.provider_spike_min_usd_per_hour:g}",
            "30m",
            "warning",
            "Spend on provider {{ $labels.provider }} spiked.",
            "Provider family {{ $labels.provider }} has cost ${{ $value | humanize }}/h over "
            f"the last 3 hours, more than {m.provider_spike_factor:g}x its 7-day average of $"
            + _query_value(f"{PROVIDER_SPEND_RATE['7d']}{{provider=%q}} * 3600", "provider")
            + "/h.",
            link="provider",
        ),
        _alert(
            cfg,
            "ResourceExporterDown",
            f"up{{{j}}} == 0 or absent(up{{{j}}})",
            "5m",
            "critical",
            "The resource exporter is down.",
            "Prometheus has not scraped the resource exporter (job {{ $labels.job }}) for 5 "
            "minutes: budget and waste numbers, and the alerts built on them, are blind.",
        ),
        _alert(
            cfg,
            "ResourceExporterStale",
            f"time() - ({c.LAST_SUCCESS}{{{j}}} or {c.START_TIME}{{{j}}})"
            f" > {m.stale_intervals:g} * {c.REFRESH_INTERVAL}{{{j}}}",
            "5m",
            "warning",
            "The resource exporter shows old numbers.",
            "The resource exporter ({{ $labels.instance }}) has not completed a successful "
            "refresh for {{ $value | humanizeDuration }}: its ledger metrics are old. Check "
            "scidex_exporter_query_success and the exporter's log.",
        ),
    ]


def rule_groups(cfg: Config = DEFAULT) -> dict[str, Any]:
    """The whole rules file.

    Rules in a group run in order, groups run independently: each alert sits in the group
    that records the series it reads, after them, so it never sees the previous evaluation's.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in alerts(cfg):
        by_name.setdefault(rule["alert"], []).append(rule)

    def pick(*names: str) -> list[dict[str, Any]]:
        return [rule for name in names for rule in by_name[name]]

    return {
        "groups": [
            {
                "name": "resource-intelligence.quests",
                "rules": recording_rules(cfg)
                + pick(
                    "QuestOverBudget",
                    "QuestBudgetThreshold",
                    "QuestBudgetBurnRate",
                    "QuestSpendAnomaly",
                    "WasteShareHigh",
                ),
            },
            {
                "name": "resource-intelligence.providers",
                "interval": "5m",
                "rules": slow_recording_rules(cfg)
                + pick("ProviderSpendSpike", "QuestMonthForecastOverBudget"),
            },
            {
                "name": "resource-intelligence.exporter",
                "rules": pick("ResourceExporterDown", "ResourceExporterStale"),
            },
        ]
    }
