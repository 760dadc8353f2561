"""Which quests keep a label of their own, day by day, and under which label each row counts.

A counter is a sum of rows, and Prometheus reads any step back as a reset (the whole value
counted again). So when quests fold into ``other``, each row counts under the label its quest
had on the row's local day, and that label is decided only from what was final before the day
began: the label of a row never changes, and no counter moves between series.

For each day D (of the configured zone):

* *candidates*: the ``max_quests`` largest by spend over the 30 days before yesterday (a row
  logged a few hours late cannot change today's choice), and the ``max_quests`` largest
  positive allocations of yesterday;
* *held*: every quest that was a candidate or got a free place on one of the
  ``fold_hold_days`` days before D (a quest near the boundary does not flap);
* candidates first, then held ones (the most recent first), at most twice ``max_quests``;
* *free places*: quests that spend on D but are none of those take a place, in the order of
  their first row that day, while fewer than ``max_quests`` quests that spend on D are kept.
  A quest new today therefore has its label from its first row whenever there is room, and a
  place taken is never taken back that day.

Everything is derived from the ledger (restart-safe: a restarted exporter decides the same).
With no more quests than ``max_quests`` every quest is kept every day, and none of this is read.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from exporter import catalog as c
from exporter.days import DAY, local_midnight
from exporter.queries import AFTER, Columns, Query

RANK_DAYS = 30
"""The days of spend a quest is ranked by (ending the day before yesterday)."""


@cache
def quest_days(cols: Columns) -> Query:
    """Valid spend and first id per quest and local day (the day is an index into
    %(midnights)s, the local midnights from the oldest row's day on)."""
    return Query(
        "spend_totals",
        f"""
    SELECT c.id <= %(safe)s AS final, c.quest,
           width_bucket(c.ts, %(midnights)s::timestamptz[]) AS day,
           sum(c.cost_usd::numeric) AS cost, min(c.id) AS first_id
    FROM cost_ledger c
    WHERE {AFTER} AND {cols.valid}
    GROUP BY 1, 2, 3
    """,
    )


Days = dict[date, dict[str, tuple[Decimal, int]]]
"""Valid spend and first id per local day and quest label."""


@dataclass(frozen=True)
class QuestDays:
    """The fold's input: spend per day and quest (final parts plus this refresh's tail), and
    the positive allocations of the days before today, as read on ``today``."""

    first_day: date | None = None  # the oldest row's day: day 1 of ``quest_days``
    today: date | None = None
    allocated: Mapping[tuple[str, date], Decimal] = field(default_factory=dict)
    safe: int | None = None  # the final parts hold the ids up to this one
    final: Days = field(default_factory=dict)
    merged: Days = field(default_factory=dict)
    tail_days: frozenset[date] = frozenset()
    since: date | None = None
    """The first day whose sums may differ from the previous state's (None: any)."""

    def folded(
        self, whole: bool, rows: Iterable[Any], safe: int, clean: Callable[[str | None], str]
    ) -> QuestDays:
        """A new state with the rows of ``quest_days`` folded in (this one is left as is)."""
        assert self.first_day is not None
        final: Days = {} if whole else dict(self.final)
        tail: Days = {}
        copied: set[date] = set()
        for r in rows:
            # Bucket 0: a row older than the oldest one seen (inserted since): its first day.
            day = self.first_day + max(r.day - 1, 0) * DAY
            if r.final and day not in copied:  # copy on write: the old state stays as it was
                final[day] = dict(final.get(day, {}))
                copied.add(day)
            _add(
                (final if r.final else tail).setdefault(day, {}), clean(r.quest), r.cost, r.first_id
            )
        merged = dict(final)
        for day, quests in tail.items():
            merged[day] = dict(final.get(day, {}))
            for quest, (cost, first) in quests.items():
                _add(merged[day], quest, cost, first)
        touched = copied | set(tail) | self.tail_days
        since = None if whole else min(touched, default=self.today)
        return replace(
            self, safe=safe, final=final, merged=merged, tail_days=frozenset(tail), since=since
        )


def _add(quests: dict[str, tuple[Decimal, int]], quest: str, cost: Decimal, first: int) -> None:
    old_cost, old_first = quests.get(quest, (Decimal(0), first))
    quests[quest] = (old_cost + cost, min(old_first, first))


class Day(NamedTuple):
    """One day's decision."""

    kept: frozenset[str]
    chosen: frozenset[str]  # candidates and free places: what the next days hold


@dataclass(frozen=True)
class Fold:
    """The kept quests of every day, and the label each row of a quest counts under."""

    kept_today: frozenset[str]
    kept_yesterday: frozenset[str]
    """Its series stay shown for a day: the rows of its last evening reach Prometheus."""
    label_of: Mapping[str, str]
    """A quest whose rows all count under one label: that label."""
    moved: Mapping[str, tuple[str, ...]]
    """A quest whose label changed between days it spent on: its label per segment."""
    bounds: tuple[datetime, ...]
    """The midnights where a moved quest's label changes: segment i starts at bounds[i-1]."""
    days: Mapping[date, Day] = field(default_factory=dict)
    """Every day's decision, which the next refresh keeps up to the first day that changed."""

    def segment(self, quest: str, ts: datetime) -> int:
        """The segment of a row (0 for a quest that never moved), as SQL's width_bucket."""
        return bisect_right(self.bounds, ts) if quest in self.moved else 0

    def today(self, quest: str) -> str:
        """The label a quest's rows of today count under."""
        return quest if quest in self.kept_today else c.OTHER

    def attribute(self, quest: str, segment: int | None) -> str:
        """The label a quest's rows of ``segment`` count under."""
        labels = self.moved.get(quest)
        if labels is not None and segment is not None:
            return labels[segment]
        return self.label_of.get(quest, c.OTHER)


def decide(
    days: Days,
    allocated: Mapping[tuple[str, date], Decimal],
    today: date,
    top: int,
    hold: int,
    zone: ZoneInfo,
    previous: Fold | None = None,
    since: date | None = None,
) -> Fold:
    """Decide every day's kept quests from the first day with spend to ``today``.

    The decisions of ``previous`` before ``since`` are kept (a day depends on earlier days
    only): a refresh whose new rows are all of today decides today alone.
    """
    spend = dict(days)
    for day in [d for d in spend if d > today]:  # a row dated in the future counts as today's
        later = spend.pop(day)
        spend[today] = merged = dict(spend.get(today, {}))
        for quest, (cost, first) in later.items():
            _add(merged, quest, cost, first)
    budget: dict[date, dict[str, Decimal]] = defaultdict(dict)
    for (quest, day), amount in allocated.items():
        if amount > 0:
            budget[day][quest] = budget[day].get(quest, Decimal(0)) + amount
    start = min(spend, default=today)
    decided: dict[date, Day] = {}
    day = start
    if previous is not None and since is not None:
        day = max(start, min(since, today))
        decided = {d: v for d, v in previous.days.items() if start <= d < day}
    rolling: dict[str, Decimal] = defaultdict(Decimal)  # spend over the ranking days
    for back in range(2, RANK_DAYS + 2):
        for quest, (cost, _) in spend.get(day - back * DAY, {}).items():
            rolling[quest] += cost
    resumed = day
    while day <= today:
        if day > resumed:
            for quest, (cost, _) in spend.get(day - 2 * DAY, {}).items():  # enters the ranking
                rolling[quest] += cost
            for quest, (cost, _) in spend.get(day - (RANK_DAYS + 2) * DAY, {}).items():  # leaves
                rolling[quest] -= cost
        candidates = _largest(rolling, top) | _largest(budget.get(day - DAY, {}), top)
        held: list[str] = []
        for back in range(1, hold + 1):
            earlier = decided.get(day - back * DAY)
            if earlier is not None:
                held += sorted(earlier.chosen - candidates)
        base = sorted(candidates)
        base += [quest for quest in dict.fromkeys(held) if quest not in candidates]
        kept = set(base[: 2 * top])
        spenders = spend.get(day, {})
        places = top - len(kept.intersection(spenders))
        free = [q for q in sorted(spenders, key=lambda q: spenders[q][1]) if q not in kept]
        free = free[: max(places, 0)]
        decided[day] = Day(frozenset(kept | set(free)), frozenset(candidates | set(free)))
        day += DAY
    return _attribution(spend, decided, today, zone)


def _largest(weights: Mapping[str, Decimal], top: int) -> frozenset[str]:
    positive = [(w, q) for q, w in weights.items() if w > 0]
    if len(positive) <= top:
        return frozenset(q for _, q in positive)
    return frozenset(q for _, q in heapq.nsmallest(top, positive, key=lambda wq: (-wq[0], wq[1])))


def _attribution(spend: Days, decided: dict[date, Day], today: date, zone: ZoneInfo) -> Fold:
    """Which label each quest's rows count under, split where it changes."""
    runs: dict[str, list[tuple[date, str]]] = {}  # per quest: (first day, label) of each run
    for day in sorted(spend):
        kept = decided[day].kept
        for quest in spend[day]:
            label = quest if quest in kept else c.OTHER
            quest_runs = runs.setdefault(quest, [(day, label)])
            if quest_runs[-1][1] != label:
                quest_runs.append((day, label))
    label_of = {quest: r[0][1] for quest, r in runs.items() if len(r) == 1}
    changes = {quest: r for quest, r in runs.items() if len(r) > 1}
    cut = sorted({day for r in changes.values() for day, _ in r[1:]})
    moved = {}
    for quest, quest_runs in changes.items():
        # Segment 0 is before the first cut, segment i from cut[i-1] on: the label of the last
        # run started by then (the first run's before any).
        labels, i = [quest_runs[0][1]], 0
        for since in cut:
            while i + 1 < len(quest_runs) and quest_runs[i + 1][0] <= since:
                i += 1
            labels.append(quest_runs[i][1])
        moved[quest] = tuple(labels)
    empty = Day(frozenset(), frozenset())
    return Fold(
        kept_today=decided.get(today, empty).kept,
        kept_yesterday=decided.get(today - DAY, empty).kept,
        label_of=label_of,
        moved=moved,
        bounds=tuple(local_midnight(day, zone) for day in cut),
        days=decided,
    )
