"""The building blocks of every metric family: catalog to family, and the label guard.

No I/O, so every rule of the metric contract is testable without a database. Label values are
cleaned first and then folded, and every family is accumulated in a dict keyed by its final
label values, so two raw values that clean or fold to the same label are summed instead of
producing a duplicate series.
"""

from __future__ import annotations

import math
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
from prometheus_client.samples import Sample

from exporter import catalog as c
from exporter.config import Settings
from exporter.fold import Fold
from exporter.labels import LabelCleaner, keep_top
from exporter.summary import quotient

Rows = Sequence[Any]
Series = dict[tuple[str, ...], float]


def info_family(metric: c.MetricSpec, values: Mapping[str, str]) -> Family:
    """Build an info family (one sample of value 1 carrying ``values`` as labels)."""
    fam = InfoMetricFamily(metric.family, metric.help, labels=())
    fam.add_metric([], dict(values))
    return fam


def family_of(
    metric: c.MetricSpec,
    series: Mapping[tuple[str, ...], float],
    samples: Samples | None = None,
) -> Family:
    """Build one family from label tuples (in the catalog's label order) to values; with
    ``samples``, a series whose value is as last built there keeps its Sample."""
    fam: CounterMetricFamily | GaugeMetricFamily
    if metric.kind == "counter":
        fam = CounterMetricFamily(metric.family, metric.help, labels=metric.labels)
        name = fam.name + "_total"
    else:
        fam = GaugeMetricFamily(metric.family, metric.help, labels=metric.labels)
        name = fam.name
    # The samples add_metric would append, built at once (thousands per refresh). Sorted by
    # labels: the same series as last time are in the order they were then (comparing the
    # keys costs less than sorting).
    names, kept = metric.labels, {}
    last = samples.last.get(name, {}) if samples is not None else {}
    out = []
    for labels in last if last.keys() == series.keys() else sorted(series):
        value = series[labels]
        sample = last.get(labels)
        if sample is None or not _same(sample.value, value):
            sample = Sample(name, dict(zip(names, labels, strict=True)), value)
        out.append(sample)
        kept[labels] = sample
    if samples is not None:
        samples.last[name] = kept
    fam.samples = out
    return fam


class Samples:
    """One exporter's families' samples as last built, by label values.

    Many series keep their value between two refreshes (those without new rows, budgets, the
    rankings): reusing their Samples saves building a label dict each, and the renderer
    (exporter/exposition.py) compares them by identity. Each refresher holds its own: shared by
    two refreshers of one process (the benchmark's ledger sizes, a test's), every family of one
    met the other's values and was built anew (a steady refresh's spend families took 25 ms
    instead of 14 at 1 M rows in the window). It holds no more series than the last families do.
    """

    def __init__(self) -> None:
        self.last: dict[str, dict[tuple[str, ...], Sample]] = {}


def _same(a: float, b: float) -> bool:
    """The same value and text: a zero's sign renders ("-0.0"), NaN never equals."""
    return a == b and (a != 0 or math.copysign(1.0, a) == math.copysign(1.0, b))


def as_float(value: Decimal | float | int | None) -> float:
    """A sum as an exposition value; NULL (no rows) is 0, and an integer past the largest
    float an infinity (as a Decimal's float is)."""
    if value is None:
        return 0.0
    return quotient(value) if isinstance(value, int) else float(value)


@dataclass
class LedgerFamilies:
    """The ledger families of one refresh, with what the label guard did to build them."""

    families: list[Family] = field(default_factory=list)
    folded: dict[str, int] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)
    labels: LabelGuard | None = None
    """The guard that labelled them (backfill labels its history with the same one)."""
    build_seconds: dict[str, float] = field(default_factory=dict)
    """Time each source took to build its families."""

    @property
    def series(self) -> int:
        return sum(len(f.samples) for f in self.families)


class LabelGuard:
    """Cleaning and folding of the quest and layer labels for one refresh.

    Sources offer the quests and layers they will label (:meth:`weigh_quest`,
    :meth:`weigh_layer`), layers with their window spend; the spend source hands over the
    quests its day-by-day fold keeps today (:meth:`fold`); :meth:`decide` then keeps those,
    the largest budgets of today and the heaviest layers and models.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.quest = LabelCleaner(settings.max_label_length)
        self.layer = LabelCleaner(settings.max_label_length)
        self.task = LabelCleaner(settings.max_label_length)
        self.model = LabelCleaner(settings.max_label_length)
        self._quest_w: dict[str, float] = defaultdict(float)
        self._layer_w: dict[str, float] = defaultdict(float)
        self._quest_budget: dict[str, float] = defaultdict(float)
        self._model_spend: dict[str, float] = defaultdict(float)
        self._model_tokens: dict[str, float] = defaultdict(float)
        self.kept_quests: frozenset[str] = frozenset()
        self.kept_layers: frozenset[str] = frozenset()
        self.kept_models: frozenset[str] = frozenset()
        self.folded: dict[str, int] = {}
        self._fold: Fold | None = None
        self._spenders: frozenset[str] | None = None
        self.history = False
        """Backfill: every label the fold counted rows under is shown, for every hour."""

    def fold(self, fold: Fold | None, spenders: frozenset[str]) -> None:
        """Take the spend source's decision: the quests with valid rows (``spenders``, cleaned),
        and the day-by-day fold, None when no quest folds (every spender keeps its label)."""
        self._fold = fold
        self._spenders = spenders if fold is None else fold.kept_today
        for quest in spenders:
            self._quest_w[quest] += 0.0

    def weigh_quest(self, raw: str | None, weight: float = 0.0) -> None:
        """Offer a quest; one with no window spend still competes for a label of its own."""
        self._quest_w[self.quest(raw)] += weight

    def weigh_budget(self, raw: str | None, allocated: float) -> None:
        """Offer a quest with today's allocation: a large budget keeps its label, spent or not."""
        label = self.quest(raw)
        self._quest_w[label] += 0.0
        if allocated > 0:
            self._quest_budget[label] += allocated

    def weigh_layer(self, raw: str | None, weight: float = 0.0) -> None:
        self._layer_w[self.layer(raw)] += weight

    def weigh_model(self, name: str | None, spend: float = 0.0, tokens: float = 0.0) -> None:
        """Offer a model with its window spend and tokens (subscription calls cost $0)."""
        label = self.model(name)
        self._model_spend[label] += spend
        self._model_tokens[label] += tokens

    def decide(self) -> LabelGuard:
        """Keep the heaviest quests, layers and models; the rest fold into ``other``.

        A quest keeps its label when the spend source's fold keeps it today or when among the
        largest positive allocations of today: a budget never hides in ``other``, so spend,
        budget and utilization of a quest always join. Room left under ``max_quests`` goes to
        the other quests seen (by name).
        """
        top = self.settings.max_quests
        kept = self._spenders if self._spenders is not None else frozenset()
        if len(kept) < top:
            rest = {quest: w for quest, w in self._quest_w.items() if quest not in kept}
            kept |= keep_top(rest, top - len(kept))
        self.kept_quests = kept | keep_top(self._quest_budget, top)
        self.kept_layers = keep_top(self._layer_w, self.settings.max_layers)
        self.kept_models = keep_top(self._model_spend, self.settings.max_models) | keep_top(
            self._model_tokens, self.settings.max_models
        )
        self.folded = {
            "quest": len(self._quest_w) - len(self.kept_quests),
            "layer": len(self._layer_w) - len(self.kept_layers),
            "model": len(self._model_spend) - len(self.kept_models),
        }
        return self

    def m(self, name: str | None) -> str:
        """Return the cleaned, folded model label."""
        value = self.model(name)
        return value if value in self.kept_models else c.OTHER

    def q(self, raw: str | None) -> str:
        """Return the cleaned, folded quest label."""
        value = self.quest(raw)
        return value if value in self.kept_quests else c.OTHER

    def counted(self, quest: str | None, segment: int | None) -> str | None:
        """The quest label a counter counts these rows under (``segment``: the fold's), None
        when that label is not shown (kept neither today nor yesterday): its rows stay with
        the series they counted in, which is gone."""
        fold = self._fold
        if fold is None:
            return self.q(quest)
        return self._shown(fold, fold.attribute(self.quest(quest), segment))

    def counted_now(self, quest: str | None) -> str | None:
        """The quest label a counter counts this quest's rows of today under."""
        fold = self._fold
        if fold is None:
            return self.q(quest)
        return self._shown(fold, fold.today(self.quest(quest)))

    def _shown(self, fold: Fold, label: str) -> str | None:
        shown = label == c.OTHER or label in self.kept_quests or label in fold.kept_yesterday
        shown = shown or self.history
        return label if shown else None

    def ql(self, quest: str | None, layer: str | None) -> tuple[str, str]:
        value = self.layer(layer)
        return self.q(quest), value if value in self.kept_layers else c.OTHER

    def cleaned(self) -> dict[str, int]:
        return {
            "quest": len(self.quest.altered),
            "layer": len(self.layer.altered),
            "task_id": len(self.task.altered),
            "model": len(self.model.altered),
        }
