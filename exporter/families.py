"""Turn the rows of the ledger queries into Prometheus metric families.

Pure functions of (rows, settings): no I/O, so every rule of the metric contract is testable
without a database. Label values are cleaned first and then folded, and every family is
accumulated in a dict keyed by its final label values, so two raw values that clean or fold to
the same label are summed instead of producing a duplicate series.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric as Family

from exporter import catalog as c
from exporter import queries as q
from exporter.config import Settings
from exporter.labels import LabelCleaner, ProviderFamilies, keep_top

Rows = Sequence[Any]
Series = dict[tuple[str, ...], float]


def new_family(metric: c.Metric) -> Family:
    """Create an empty prometheus-client family for a catalog metric."""
    if metric.kind == "counter":
        return CounterMetricFamily(metric.family, metric.help, labels=metric.labels)
    if metric.kind == "info":
        return InfoMetricFamily(metric.family, metric.help, labels=())
    return GaugeMetricFamily(metric.family, metric.help, labels=metric.labels)


def family_of(metric: c.Metric, series: Mapping[tuple[str, ...], float]) -> Family:
    """Build one family from label tuples (in the catalog's label order) to values."""
    fam = new_family(metric)
    for labels, value in sorted(series.items()):
        fam.add_metric(list(labels), value)
    return fam


def _f(value: Decimal | float | int | None) -> float:
    return 0.0 if value is None else float(value)


@dataclass
class LedgerFamilies:
    """The ledger families of one refresh, with what the label guard did to build them."""

    families: list[Family] = field(default_factory=list)
    folded: dict[str, int] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)

    @property
    def series(self) -> int:
        return sum(len(f.samples) for f in self.families)


class LabelGuard:
    """Cleaning and folding of the quest and layer labels for one refresh."""

    def __init__(self, settings: Settings, rows: Mapping[str, Rows]) -> None:
        self.quest = LabelCleaner(settings.max_label_length)
        self.layer = LabelCleaner(settings.max_label_length)
        self.task = LabelCleaner(settings.max_label_length)
        quest_w: dict[str, float] = defaultdict(float)
        layer_w: dict[str, float] = defaultdict(float)
        for r in rows.get(q.SPEND_TOTALS.name, ()):
            if r.reason is None:
                quest_w[self.quest(r.quest)] += _f(r.cost_window)
                layer_w[self.layer(r.layer)] += _f(r.cost_window)
        # Quests seen only in budgets or the window still compete for a label of their own.
        for r in rows.get(q.BUDGET_TODAY.name, ()):
            quest_w[self.quest(r.quest)] += 0.0
        for r in rows.get(q.WINDOW_TASKS.name, ()):
            if r.kind in ("waste_total", "quest"):
                quest_w[self.quest(r.quest)] += 0.0
            if r.kind == "waste_total":
                layer_w[self.layer(r.layer)] += 0.0
        self.kept_quests = keep_top(quest_w, settings.max_quests)
        self.kept_layers = keep_top(layer_w, settings.max_layers)
        self.folded = {
            "quest": len(quest_w) - len(self.kept_quests),
            "layer": len(layer_w) - len(self.kept_layers),
        }

    def q(self, raw: str | None) -> str:
        """Return the cleaned, folded quest label."""
        value = self.quest(raw)
        return value if value in self.kept_quests else c.OTHER

    def ql(self, quest: str | None, layer: str | None) -> tuple[str, str]:
        value = self.layer(layer)
        return self.q(quest), value if value in self.kept_layers else c.OTHER

    def cleaned(self) -> dict[str, int]:
        return {
            "quest": len(self.quest.altered),
            "layer": len(self.layer.altered),
            "task_id": len(self.task.altered),
        }


def build_ledger(
    rows: Mapping[str, Rows], settings: Settings, providers: ProviderFamilies
) -> LedgerFamilies:
    """Build every ledger family from the latest good rows of each query.

    A query missing from ``rows`` (never succeeded) leaves its families out entirely.
    """
    labels = LabelGuard(settings, rows)
    out = LedgerFamilies()
    excluded: Series = {}
    for relation, reason in q.EXCLUSION_REASONS:
        if q.QUERY_OF_RELATION[relation].name in rows:
            excluded[(relation, reason)] = 0.0
    spend_today: Series = {}
    if q.SPEND_TOTALS.name in rows:
        out.families += _spend(rows[q.SPEND_TOTALS.name], labels, providers, excluded, spend_today)
    if q.BUDGET_TODAY.name in rows:
        out.families += _budget(rows[q.BUDGET_TODAY.name], labels, excluded, spend_today)
    if q.SPEND_TOTALS.name in rows:
        out.families.append(family_of(c.QUEST_SPEND_TODAY, spend_today))
    if excluded:
        out.families.append(family_of(c.LEDGER_EXCLUDED_ROWS, excluded))
    if q.WINDOW_TASKS.name in rows:
        out.families += _window(rows[q.WINDOW_TASKS.name], labels)
        out.families += _providers(
            [r for r in rows[q.WINDOW_TASKS.name] if r.kind == "provider"], providers
        )
    out.folded = labels.folded
    out.cleaned = labels.cleaned()
    return out


def _spend(
    rows: Rows,
    labels: LabelGuard,
    providers: ProviderFamilies,
    excluded: Series,
    spend_today: Series,
) -> list[Family]:
    # Counters are summed exactly and converted to float once: float sums in a different order
    # (several raw providers fold into one family) can differ in the last bit between refreshes,
    # and a counter that steps back by one ulp is a reset to Prometheus.
    spend: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    calls: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    tokens: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    last_ts: float | None = None
    for r in rows:
        if r.reason is not None:
            key = ("cost_ledger", r.reason)
            excluded[key] = excluded.get(key, 0.0) + r.calls
            continue
        quest, layer = labels.ql(r.quest, r.layer)
        key = (quest, layer, providers.family(r.provider))
        spend[key] += r.cost or 0
        calls[key] += r.calls
        tokens[(*key, "input")] += r.input_tokens or 0
        tokens[(*key, "output")] += r.output_tokens or 0
        if r.cost_today is not None:
            spend_today[(quest,)] = spend_today.get((quest,), 0.0) + _f(r.cost_today)
        if r.last_ts is not None:
            last_ts = max(last_ts or 0.0, r.last_ts.timestamp())
    families = [
        family_of(c.SPEND, {k: float(v) for k, v in spend.items()}),
        family_of(c.TOKENS, {k: float(v) for k, v in tokens.items()}),
        family_of(c.CALLS, {k: float(v) for k, v in calls.items()}),
    ]
    if last_ts is not None:
        families.append(family_of(c.LEDGER_LAST_CALL, {(): last_ts}))
    return families


def _budget(rows: Rows, labels: LabelGuard, excluded: Series, spend_today: Series) -> list[Family]:
    allocated: Series = defaultdict(float)
    for r in rows:
        if r.excluded:
            key = ("quest_budget_allocations", "invalid_allocation")
            excluded[key] = excluded.get(key, 0.0) + r.excluded
        if r.allocated is not None:
            allocated[(labels.q(r.quest),)] += _f(r.allocated)
    for key in allocated:
        spend_today.setdefault(key, 0.0)
    utilization = {
        key: spend_today.get(key, 0.0) / budget for key, budget in allocated.items() if budget > 0
    }
    return [family_of(c.BUDGET_ALLOCATED, allocated), family_of(c.BUDGET_UTILIZATION, utilization)]


def _window(rows: Rows, labels: LabelGuard) -> list[Family]:
    ranked: dict[str, dict[tuple[str, ...], Any]] = {"efficiency": {}, "waste": {}}
    waste: dict[str, Series] = {
        "tokens": defaultdict(float),
        "usd": defaultdict(float),
        "tasks": defaultdict(float),
    }
    quest_cost: Series = defaultdict(float)
    quest_impact: Series = defaultdict(float)
    for r in rows:
        if r.kind in ranked:
            key = (labels.task(r.task_id), labels.quest(r.quest), labels.layer(r.layer))
            # Keep the better-ranked task when two ids clean to the same label values.
            ranked[r.kind].setdefault(key, r)
        elif r.kind == "waste_total":
            key = labels.ql(r.quest, r.layer)
            waste["tokens"][key] += _f(r.tokens)
            waste["usd"][key] += _f(r.cost)
            waste["tasks"][key] += r.tasks
        elif r.kind == "quest":
            key = (labels.q(r.quest),)
            quest_cost[key] += _f(r.cost)
            quest_impact[key] += _f(r.impact)
    eff, wasted = ranked["efficiency"], ranked["waste"]
    return [
        family_of(c.TASK_IMPACT_PER_USD, {k: r.impact / _f(r.cost) for k, r in eff.items()}),
        family_of(c.TASK_COST, {k: _f(r.cost) for k, r in eff.items()}),
        family_of(c.TASK_IMPACT, {k: r.impact for k, r in eff.items()}),
        family_of(c.TASK_WASTED_TOKENS, {k: _f(r.tokens) for k, r in wasted.items()}),
        family_of(c.TASK_WASTED_USD, {k: _f(r.cost) for k, r in wasted.items()}),
        family_of(c.WASTED_TOKENS, waste["tokens"]),
        family_of(c.WASTED_USD, waste["usd"]),
        family_of(c.WASTED_TASKS, waste["tasks"]),
        family_of(c.QUEST_WINDOW_SPEND, quest_cost),
        family_of(c.QUEST_WINDOW_IMPACT, quest_impact),
        family_of(
            c.QUEST_IMPACT_PER_USD,
            {k: quest_impact[k] / cost for k, cost in quest_cost.items() if cost > 0},
        ),
    ]


def _providers(rows: Rows, providers: ProviderFamilies) -> list[Family]:
    found = {r.family: r for r in rows}
    spend, tasks, tokens, avg = {}, {}, {}, {}
    for name in providers.families:
        r = found.get(name)
        key = (name,)
        spend[key] = _f(r.cost) if r else 0.0
        tasks[key] = float(r.tasks) if r else 0.0
        tokens[key] = _f(r.tokens) if r else 0.0
        if tasks[key] > 0:
            avg[key] = spend[key] / tasks[key]
    return [
        family_of(c.PROVIDER_SPEND, spend),
        family_of(c.PROVIDER_TASKS, tasks),
        family_of(c.PROVIDER_TOKENS, tokens),
        family_of(c.PROVIDER_AVG_COST, avg),
    ]
