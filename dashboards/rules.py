"""Prometheus recording rules and alerts, generated from the exporter's metric catalog.

Every selector, threshold and window comes from one :class:`~dashboards.config.Config` (as
kubernetes-mixin's config does); recording-rule names follow ``level:metric:operation`` and
are constants the dashboard imports.
"""

from __future__ import annotations

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
    *PROVIDER_SPEND_RATE.values(),
)
RECORDED = frozenset(m.name for m in RECORDED_METRICS)

ALERT_NAMES = (
    "QuestOverBudget",
    "QuestBudgetBurnRate",
    "WasteShareHigh",
    "ProviderSpendSpike",
    "ResourceExporterDown",
    "ResourceExporterStale",
)


def _record(metric: c.MetricSpec, expr: str) -> dict[str, str]:
    return {"record": metric.name, "expr": expr}


def recording_rules(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """Rules evaluated every interval: cheap aggregations over the latest samples."""
    j = cfg.sel
    rules = [
        _record(QUEST_BUDGET, f"sum by (quest) ({c.BUDGET_ALLOCATED}{{{j}}})"),
        _record(QUEST_SPEND_TODAY, f"sum by (quest) ({c.QUEST_SPEND_TODAY}{{{j}}})"),
        _record(QUEST_WINDOW_SPEND, f"sum by (quest) ({c.QUEST_WINDOW_SPEND}{{{j}}})"),
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
    return rules


def slow_recording_rules(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """Long windows, evaluated every 5 minutes: they change slowly and read many samples."""
    j = cfg.sel
    return [
        _record(QUEST_DAILY_SPEND, f"sum by (quest) (increase({c.SPEND}{{{j}}}[1d]))"),
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


def _query_value(expr: str, label: str = "quest", fmt: str = "humanize") -> str:
    """A template snippet printing the first value of ``expr``, whose ``%q`` is the label.

    ``%q`` quotes the value as a Go string literal, which PromQL reads back unchanged: a
    quest name with a quote or a backslash selects its own series.
    """
    return (
        f"{{{{ with printf `{expr}` $labels.{label} | query }}}}"
        f"{{{{ . | first | value | {fmt} }}}}{{{{ end }}}}"
    )


def alerts(cfg: Config = DEFAULT) -> list[dict[str, Any]]:
    """The alerts: budget overspend and burn, waste, provider spikes, exporter health."""
    j = cfg.sel
    m = cfg.mixin
    budget_of = _query_value(f"{QUEST_BUDGET}{{quest=%q}}")
    fast, slow = m.fast_burn, m.slow_burn
    big_enough = f"on (quest) ({QUEST_BUDGET} >= {m.min_allocation_usd:g})"
    burn = QUEST_BURN_RATE
    return [
        _alert(
            cfg,
            "QuestOverBudget",
            f"{QUEST_SPEND_TODAY} > on (quest) ({QUEST_BUDGET} > 0)",
            m.over_budget_for,
            "warning",
            "Quest {{ $labels.quest }} is over today's budget.",
            "Quest {{ $labels.quest }} has spent ${{ $value | humanize }} today, more than "
            f"its allocation of ${budget_of}.",
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
                + pick("QuestOverBudget", "QuestBudgetBurnRate", "WasteShareHigh"),
            },
            {
                "name": "resource-intelligence.providers",
                "interval": "5m",
                "rules": slow_recording_rules(cfg) + pick("ProviderSpendSpike"),
            },
            {
                "name": "resource-intelligence.exporter",
                "rules": pick("ResourceExporterDown", "ResourceExporterStale"),
            },
        ]
    }
