"""Backfill: the exporter's metric history from the ledger, as OpenMetrics with timestamps.

Loaded with ``promtool tsdb create-blocks-from openmetrics``, it gives Prometheus the last N days
on the day of installation. Consistency with the live exporter is the point:

* label values are cleaned and folded by the very guard a live refresh uses, computed from one
  live refresh, and each sample carries the ``job``/``instance`` labels the live scrape adds,
  so backfilled and live samples land in the same series;
* a row counts under the label its quest had on the row's day (exporter/fold.py), as it did
  live; the series of a quest kept on past days but not today is backfilled too;
* a counter at hour H holds every valid row before H, so it only grows into the live value
  (no reset, no jump at the seam); sums are exact (Decimal, as PostgreSQL's numeric) and
  converted to float once, as the live exporter does, so not even the last bit differs;
* counters get a sample at the start, at every midnight (of UTC and of the configured zone,
  whose days the dashboard shows) and at every hour they moved, so ``increase(...[1d])``
  between midnights is exactly the day's ledger sum (for a zone whose midnights fall on a UTC
  hour; a zone 30 minutes off, such as Asia/Kolkata, gets hourly sums).

Only families that have a history in the ledger are backfilled: the cumulative counters (spend,
tokens, calls, models, list prices; computed by the live exporter's own function), today's
budget, spend today and utilization. The 30-day window families describe
"now" and start with the live exporter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO

from exporter import catalog as c
from exporter import queries as q
from exporter.config import ConfigError, Settings
from exporter.days import local_midnight
from exporter.families import LabelGuard, Series
from exporter.incremental import ZERO, Sums
from exporter.prices import PriceBook
from exporter.refresh import Refresher, connect
from exporter.sources import SpendSource
from exporter.sources.spend import Key, cumulative

HOUR = timedelta(hours=1)
SeriesKey = tuple[c.MetricSpec, tuple[tuple[str, str], ...]]


@dataclass
class Summary:
    """What a backfill wrote."""

    series: int = 0
    samples: int = 0
    start: datetime | None = None
    end: datetime | None = None


def _floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


class _History:
    """Samples per series, in time order."""

    def __init__(self, job: str, instance: str) -> None:
        self.target = (("instance", instance), ("job", job))
        self.samples: dict[SeriesKey, list[tuple[float, float]]] = defaultdict(list)

    def add(
        self, metric: c.MetricSpec, labels: Iterable[tuple[str, str]], at: datetime, value: float
    ) -> None:
        key = (metric, tuple(sorted((*labels, *self.target))))
        self.samples[key].append((at.timestamp(), value))


def backfill(
    settings: Settings,
    days: int,
    out: TextIO,
    *,
    job: str,
    instance: str,
    now: datetime | None = None,
) -> Summary:
    """Write ``days`` of history ending at the last full hour before ``now`` to ``out``."""
    now = now or datetime.now(UTC)
    refresher = Refresher(settings)
    spend = refresher.source(SpendSource)
    try:
        if not refresher.refresh(now) and not spend.has_data:
            raise ConfigError("backfill needs a working database: the live queries failed")
        guard = refresher.ledger.labels
        assert guard is not None  # every refresh labels its families
        guard.history = True  # a quest's series of days it was kept, even if it is no longer
    finally:
        refresher.close()
    end = _floor_hour(now)
    start = end - timedelta(days=days)
    history = _History(job, instance)
    conn = connect(settings)
    try:
        with conn.transaction():
            hourly = conn.execute(
                q.hourly_spend(refresher.columns, spend.prices.periods).sql,
                {"start": start, "end": end, **spend.prices.params(), **spend.split},
            ).fetchall()
            budgets = conn.execute(
                q.BUDGET_DAYS.sql,
                {
                    "first_day": start.astimezone(settings.zone).date(),
                    "last_day": end.astimezone(settings.zone).date(),
                },
            ).fetchall()
    finally:
        conn.close()
    hours = [start + i * HOUR for i in range(int((end - start) / HOUR) + 1)]
    counters = Counters(guard, refresher.providers.family, spend.prices)
    # Every series the live exporter has, even one whose first row came after the last full
    # hour, gets a history (of zeros) so increase() sees it start from 0 rather than appear.
    live = counters.of(spend.totals.totals)
    spend_by_hour = _counters(history, hourly, live, counters, hours, settings)
    _budgets(history, budgets, spend_by_hour, guard, settings, hours)
    return _write(history, out, start, end)


@dataclass(frozen=True)
class Counters:
    """The live exporter's counter families, computed from running totals at any hour."""

    labels: LabelGuard
    family: Callable[[str | None], str]
    prices: PriceBook

    def of(self, totals: Mapping[Key, Sums]) -> dict[c.MetricSpec, Series]:
        return cumulative(totals, self.labels, self.family, self.prices)


def _counters(
    history: _History,
    rows: list[Any],
    live: Mapping[c.MetricSpec, Series],
    counters: Counters,
    hours: list[datetime],
    settings: Settings,
) -> dict[tuple[datetime, str], float]:
    """Emit the cumulative counters; return each folded quest's spend per hour bucket.

    ``rows`` are hourly sums (``hour`` is None for everything before the start); every series
    in ``live`` or ``rows`` is emitted from the start, at 0 until its first row.
    """
    totals: dict[Key, Sums] = {}
    buckets: dict[datetime, list[tuple[Key, Any]]] = defaultdict(list)
    spend_by_hour: dict[tuple[datetime, str], float] = defaultdict(float)
    for r in rows:
        key = Key(r.quest, r.layer, r.provider, r.model, r.period, None, r.segment)
        if r.hour is None:
            totals[key] = totals.get(key, ZERO) + Sums.of(r)
        else:
            buckets[r.hour].append((key, r))
            spend_by_hour[(r.hour, counters.labels.q(r.quest))] += float(r.cost)
    # Every series any hour will have, so each starts at 0 from the first sample on.
    every: dict[c.MetricSpec, set[tuple[str, ...]]] = defaultdict(set)
    final = dict(totals)
    for hour_rows in buckets.values():
        for key, r in hour_rows:
            final[key] = final.get(key, ZERO) + Sums.of(r)
    for source in (live, counters.of(final)):
        for metric, series in source.items():
            every[metric].update(series)
    last: dict[tuple[c.MetricSpec, tuple[str, ...]], float] = {}
    values = counters.of(totals)
    for at in hours:
        # Midnights of the configured zone (the dashboard's days) and of UTC.
        midnight = at.hour == 0 or at.astimezone(settings.zone).time() == datetime.min.time()
        always = midnight or at in (hours[0], hours[-1])
        for metric, labels in every.items():
            for label_values in labels:
                value = values[metric].get(label_values, 0.0)
                if always or last.get((metric, label_values)) != value:
                    history.add(metric, zip(metric.labels, label_values, strict=True), at, value)
                    last[(metric, label_values)] = value
        if at in buckets:  # this hour's rows count from the next sample on
            for key, r in buckets[at]:
                totals[key] = totals.get(key, ZERO) + Sums.of(r)
            values = counters.of(totals)
    return spend_by_hour


def _budgets(
    history: _History,
    rows: list[Any],
    spend_by_hour: dict[tuple[datetime, str], float],
    guard: LabelGuard,
    settings: Settings,
    hours: list[datetime],
) -> None:
    """Emit each day's allocation at its midnight, and spend today / utilization hourly."""
    allocated: dict[tuple[date, str], float] = defaultdict(float)
    for r in rows:
        allocated[(r.day, guard.q(r.quest))] += float(r.allocated)
    for (day, quest), value in sorted(allocated.items()):
        midnight = local_midnight(day, settings.zone)
        if hours[0] <= midnight <= hours[-1]:
            history.add(c.BUDGET_ALLOCATED, [("quest", quest)], midnight, value)
    quests = {quest for _, quest in allocated} | {quest for _, quest in spend_by_hour}
    for at in hours:
        day = at.astimezone(settings.zone).date()
        since = max(local_midnight(day, settings.zone), hours[0])
        for quest in sorted(quests):
            spent = sum(spend_by_hour.get((h, quest), 0.0) for h in _hours_between(since, at))
            budget = allocated.get((day, quest))
            if budget is None and spent == 0:
                continue
            history.add(c.QUEST_SPEND_TODAY, [("quest", quest)], at, spent)
            if budget:
                history.add(c.BUDGET_UTILIZATION, [("quest", quest)], at, spent / budget)


def _hours_between(since: datetime, until: datetime) -> Iterator[datetime]:
    at = _floor_hour(since)
    while at < until:
        yield at
        at += HOUR


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return (
        repr(value)
        if math.isfinite(value)
        else ("NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf"))
    )


def _write(history: _History, out: TextIO, start: datetime, end: datetime) -> Summary:
    summary = Summary(start=start, end=end)
    by_family: dict[c.MetricSpec, list[SeriesKey]] = defaultdict(list)
    for key in history.samples:
        by_family[key[0]].append(key)
    for metric in sorted(by_family, key=lambda m: m.name):
        out.write(f"# HELP {metric.family} {metric.help}\n# TYPE {metric.family} {metric.kind}\n")
        for key in sorted(by_family[metric], key=lambda k: k[1]):
            labels = ",".join(f'{name}="{_escape(value)}"' for name, value in key[1])
            for ts, value in history.samples[key]:
                out.write(f"{metric.name}{{{labels}}} {_number(value)} {ts:.3f}\n")
                summary.samples += 1
            summary.series += 1
    out.write("# EOF\n")
    return summary
