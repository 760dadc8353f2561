"""Backfill: the exporter's metric history from the ledger, as OpenMetrics with timestamps.

Loaded with ``promtool tsdb create-blocks-from openmetrics``, it gives Prometheus the last N days
on the day of installation. Consistency with the live exporter is the point:

* label values are cleaned and folded by the very guard a live refresh uses, computed from one
  live refresh, and each sample carries the ``job``/``instance`` labels the live scrape adds,
  so backfilled and live samples land in the same series;
* a counter at hour H holds every valid row before H, so it only grows into the live value
  (no reset, no jump at the seam); sums are exact (Decimal, as PostgreSQL's numeric) and
  converted to float once, as the live exporter does, so not even the last bit differs;
* counters get a sample at the start, at every UTC midnight and at every hour they moved, so
  ``increase(...[1d])`` between midnights is exactly the day's ledger sum.

Only families that have a history in the ledger are backfilled: spend, tokens and calls
counters, today's budget, spend today and utilization. The 30-day window families describe
"now" and start with the live exporter.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO

from exporter import catalog as c
from exporter import queries as q
from exporter.config import ConfigError, Settings
from exporter.families import LabelGuard
from exporter.incremental import ZERO, Sums
from exporter.refresh import Refresher, connect
from exporter.sources import SpendSource

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


def _local_midnight(day: date, settings: Settings) -> datetime:
    return datetime.combine(day, datetime.min.time(), settings.zone).astimezone(UTC)


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
    finally:
        refresher.close()
    end = _floor_hour(now)
    start = end - timedelta(days=days)
    history = _History(job, instance)
    conn = connect(settings)
    try:
        with conn.transaction():
            hourly = conn.execute(q.HOURLY_SPEND.sql, {"start": start, "end": end}).fetchall()
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
    family = refresher.providers.family
    # Every series the live exporter has, even one whose first row came after the last full
    # hour, gets a history (of zeros) so increase() sees it start from 0 rather than appear.
    live = {
        (*guard.ql(r.quest, r.layer), family(r.provider))
        for r in spend.series()
        if r.reason is None
    }
    spend_by_hour = _counters(history, hourly, live, guard, family, hours)
    _budgets(history, budgets, spend_by_hour, guard, settings, hours)
    return _write(history, out, start, end)


def _counters(
    history: _History,
    rows: list[Any],
    live: Iterable[tuple[str, str, str]],
    guard: LabelGuard,
    family: Callable[[str | None], str],
    hours: list[datetime],
) -> dict[tuple[datetime, str], float]:
    """Emit the cumulative counters; return each folded quest's spend per hour bucket.

    ``rows`` are hourly sums (``hour`` is None for everything before the start); every series
    in ``live`` or ``rows`` is emitted from the start, at 0 until its first row.
    """
    totals: dict[tuple[str, str, str], Sums] = dict.fromkeys(live, ZERO)
    buckets: dict[datetime, list[Any]] = defaultdict(list)
    spend_by_hour: dict[tuple[datetime, str], float] = defaultdict(float)
    for r in rows:
        quest, layer = guard.ql(r.quest, r.layer)
        key = (quest, layer, family(r.provider))
        totals.setdefault(key, ZERO)
        if r.hour is None:
            totals[key] += Sums.of(r)
        else:
            buckets[r.hour].append((key, r))
            spend_by_hour[(r.hour, quest)] += float(r.cost)
    last: dict[tuple[str, str, str], Sums] = {}
    for at in hours:
        midnight = at.hour == 0
        for key, sums in totals.items():
            if midnight or at in (hours[0], hours[-1]) or last.get(key) != sums:
                _emit_counters(history, key, sums, at)
                last[key] = sums
        for key, r in buckets.get(at, ()):  # this hour's rows count from the next sample on
            totals[key] += Sums.of(r)
    return spend_by_hour


def _emit_counters(history: _History, key: tuple[str, str, str], sums: Sums, at: datetime) -> None:
    labels = list(zip(("quest", "layer", "provider"), key, strict=True))
    history.add(c.SPEND, labels, at, float(sums.cost))
    history.add(c.CALLS, labels, at, float(sums.calls))
    history.add(c.TOKENS, [*labels, ("direction", "input")], at, float(sums.input_tokens))
    history.add(c.TOKENS, [*labels, ("direction", "output")], at, float(sums.output_tokens))


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
        midnight = _local_midnight(day, settings)
        if hours[0] <= midnight <= hours[-1]:
            history.add(c.BUDGET_ALLOCATED, [("quest", quest)], midnight, value)
    quests = {quest for _, quest in allocated} | {quest for _, quest in spend_by_hour}
    for at in hours:
        day = at.astimezone(settings.zone).date()
        since = max(_local_midnight(day, settings), hours[0])
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
