"""Per-task lifetime sums of the window's tasks, kept so a refresh reads only the new rows.

The window families rank, sum and classify the tasks with a valid row in the window by what
each spent over its whole life. Reading that from the ledger every refresh costs the window
plus every earlier row of long-running tasks. Instead the exporter keeps, per window task, the
sums over ids <= a watermark (the same snapshot-safe watermark as the cumulative sums, see
exporter/incremental.py) and re-reads the rows after it; a task that enters the window (a new
task, or an old one with a new row) has its history read once, and only the impacts measured
since the last refresh are read. Tasks leave when their latest row falls out of the window. The
rankings and sums are kept with them (exporter/summary.py), so a refresh re-ranks only what
changed. The periodic full reconciliation rebuilds everything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, NamedTuple

from sortedcontainers import SortedKeyList

from exporter.config import Settings
from exporter.incremental import Plan, Sums
from exporter.labels import ProviderFamilies
from exporter.models import model_ref
from exporter.prices import Price, PriceBook
from exporter.summary import Amount, Summary, WindowRow, amount


@dataclass(slots=True)
class Task:
    """One task's valid spend, by provider family, and its latest valid row's labels.

    Kept small (tens of thousands are held): most tasks use one provider family, so the
    per-family split is a dict only for the few that use several.
    """

    cost: Amount = 0
    tokens: int = 0
    listed: Amount = 0  # list-price value of its priced calls
    last_ts: datetime | None = None
    quest: str | None = None
    layer: str | None = None
    family: str | None = None  # the only family so far (None: none yet, or several)
    shares: dict[str, list[Any]] | None = None  # family -> [cost, tokens, listed], once several

    def add(self, family: str, cost: Amount, tokens: int, listed: Amount) -> None:
        if self.shares is None and self.family != family:
            if self.family is None:  # the first sum of this task
                self.family = family
            else:
                self.shares = {self.family: [self.cost, self.tokens, self.listed]}
                self.family = None
        if self.shares is not None:
            acc = self.shares.setdefault(family, [0, 0, 0])
            acc[0] += cost
            acc[1] += tokens
            acc[2] += listed
        self.cost += cost
        self.tokens += tokens
        self.listed += listed

    def by_family(self) -> Iterable[tuple[str, Amount, int, Amount]]:
        if self.shares is not None:
            return ((f, c, t, li) for f, (c, t, li) in self.shares.items())
        if self.family is None:
            return ()
        return ((self.family, self.cost, self.tokens, self.listed),)

    def label(self, last_ts: datetime, quest: str | None, layer: str | None) -> None:
        """Take the labels of a later row; on a tie the later part (larger ids) wins."""
        if self.last_ts is None or last_ts >= self.last_ts:
            self.last_ts, self.quest, self.layer = last_ts, _intern(quest), _intern(layer)

    def merged(self, tail: Task) -> Task:
        """This task with the rows of a later part added (a copy: self is kept as is)."""
        out = Task(
            self.cost, self.tokens, self.listed, self.last_ts, self.quest, self.layer, self.family
        )
        if self.shares is not None:
            out.shares = {f: list(v) for f, v in self.shares.items()}
        for family, cost, tokens, listed in tail.by_family():
            out.add(family, cost, tokens, listed)
        if tail.last_ts is not None:
            out.label(tail.last_ts, tail.quest, tail.layer)
        return out


def _intern(value: str | None) -> str | None:
    """One string object per distinct label value, however many tasks carry it."""
    return None if value is None else sys.intern(value)


@dataclass
class WindowTasks:
    """Every window task's sums, its latest impact, and the summary ranked from them.

    ``final`` holds the sums over ids <= ``frozen_id``; ``open`` the tasks with rows after it
    as of the last refresh (their final part merged with those rows: the state the summary
    holds for them). Every task held is in the window and in ``summary`` and ``by_time``.
    """

    settings: Settings
    final: dict[str, Task] = field(default_factory=dict)
    open: dict[str, Task] = field(default_factory=dict)
    impacts: dict[str, float] = field(default_factory=dict)  # measured ones only
    frozen_id: int = -1
    impacts_since: datetime | None = None
    """A steady refresh reads the impacts measured after this (the database's clock at the
    last refresh, less ``impact_lag_seconds``)."""
    summary: Summary = field(init=False)
    by_time: SortedKeyList = field(init=False)  # the task ids, by their task's last_ts
    cutoff: datetime | None = None  # the grace cutoff ``summary`` classified waste with

    def __post_init__(self) -> None:
        self.summary = Summary(self.settings)
        self.by_time = self._by_time(())

    def _by_time(self, task_ids: Iterable[str]) -> SortedKeyList:
        """The held tasks by their latest row (a key per task, the ``datetime`` it holds)."""
        return SortedKeyList(task_ids, key=lambda task_id: self.task(task_id).last_ts)

    def bounds(self, plan: Plan) -> tuple[bool, int]:
        """Return (full, safe): whether to rebuild, and the id up to which rows are final.

        A steady statement reads the ids after ``frozen_id``. Rebuild at a reconciliation, and
        while nothing is final yet (the first refresh of an exporter has no watermark): a tail
        from id -1 would be the whole ledger.
        """
        return plan.full or self.frozen_id < 0, max(plan.safe, self.frozen_id)

    def entering(self, tail: Iterable[Any]) -> str:
        """The tail's tasks that ``final`` does not hold (new, or back in the window), as the
        JSON array the history statement reads: their earlier rows are read once."""
        return json.dumps(sorted({r.task_id for r in tail} - self.final.keys()))

    def task(self, task_id: str) -> Task:
        """A held task as the summary counts it."""
        return self.open.get(task_id) or self.final[task_id]

    def rows(self) -> list[WindowRow]:
        return self.summary.rows(self.task, self.impacts, self._every)

    def _every(self) -> Iterator[tuple[str, Task, float | None, bool]]:
        """Every held task as the summary took it."""
        assert self.cutoff is not None  # set by every rebuild and steady refresh
        for task_id in [*self.final, *(k for k in self.open if k not in self.final)]:
            t, impact = self.task(task_id), self.impacts.get(task_id)
            yield task_id, t, impact, self.summary.wasted_task(t, impact, self.cutoff)

    def rebuild(self, plan: Plan, rows: Iterable[Any], now: Now) -> None:
        """Replace everything held by a rebuild's rows (parts 0 and 2, and every window
        task's impact).

        What was held is dropped first, so that the window's tasks are never held twice: the
        source keeps publishing its last rows if ``rows`` (a stream) fails part way, and the
        next refresh rebuilds again.
        """
        window_start, grace_cutoff, priced = now
        self.final, self.open, self.impacts, self.by_time = {}, {}, {}, self._by_time(())
        self.summary, self.frozen_id = Summary(self.settings), -1
        final: dict[str, Task] = {}
        open_tail: dict[str, Task] = {}
        impacts: dict[str, float] = {}
        clock = None
        for r in rows:
            if r.kind == "impact":
                if r.impact is not None:  # no score and no impact row both count as none
                    impacts[r.task_id] = r.impact
            elif r.kind == "clock":
                clock = r.last_ts
            else:
                _fold(final if r.part == 0 else open_tail, r, priced)
        opened = _merged(final, open_tail)
        summary = self.summary
        held = []  # the window's tasks; the others are dropped on the way
        for task_id in [*final, *(k for k in opened if k not in final)]:
            t = opened.get(task_id) or final[task_id]
            if t.last_ts is None or t.last_ts < window_start:
                final.pop(task_id, None)
                opened.pop(task_id, None)
                impacts.pop(task_id, None)
                continue
            impact = impacts.get(task_id)
            held.append(task_id)
            summary.add(task_id, t, impact, summary.wasted_task(t, impact, grace_cutoff))
        for task_id in [k for k in impacts if k not in final and k not in opened]:
            del impacts[task_id]
        self.final, self.open, self.impacts = final, opened, impacts
        self.by_time = self._by_time(held)
        self.cutoff = grace_cutoff
        self.frozen_id = self.bounds(plan)[1]
        self._clock(clock)

    def advance(self, plan: Plan, tail: list[Any], history: list[Any], now: Now) -> None:
        """Fold in a steady refresh's rows: the tail after ``frozen_id`` (parts 1 and 2), the
        entering tasks' earlier rows (part 0), and the impacts that changed.

        Only the tasks these touch, and those that left the window or crossed the grace
        cutoff since the last refresh, are taken out of the summary and put back. A failure
        half way leaves nothing trustworthy: everything is dropped and the next refresh
        rebuilds.
        """
        try:
            self._touch(tail, history, now)
        except BaseException:
            self.frozen_id = -1  # rebuild at the next refresh
            raise
        self.frozen_id = self.bounds(plan)[1]

    def _touch(self, tail: list[Any], history: list[Any], now: Now) -> None:
        window_start, grace_cutoff, priced = now
        old_cutoff = self.cutoff if self.cutoff is not None else grace_cutoff
        sums = [r for r in history if r.kind in ("sum", "label")] + tail
        impacts = [r for r in history if r.kind == "impact"]
        clock = next((r.last_ts for r in history if r.kind == "clock"), None)
        touched = set(self.open)  # re-derived from this tail
        touched.update(r.task_id for r in sums)
        final, opened = self.final, self.open  # (a union of their keys would cost the window)
        touched.update(r.task_id for r in impacts if r.task_id in final or r.task_id in opened)
        # Time moves too: tasks whose latest row left the window, or crossed the grace cutoff
        # (either way, if the clock stepped back).
        by_time = self.by_time
        touched.update(by_time.irange_key(None, window_start, (True, False)))
        low, high = sorted((old_cutoff, grace_cutoff))
        touched.update(by_time.irange_key(low, high, (True, False)))

        summary = self.summary
        for task_id in touched:
            t = self.open.get(task_id) or self.final.get(task_id)
            if t is not None:
                impact = self.impacts.get(task_id)
                summary.remove(task_id, t, impact, summary.wasted_task(t, impact, old_cutoff))
                by_time.remove(task_id)
        open_tail: dict[str, Task] = {}
        for r in sorted(sums, key=lambda r: r.part):  # final before open, ids growing
            _fold(self.final if r.part < 2 else open_tail, r, priced)
        self.open = _merged(self.final, open_tail)
        for r in impacts:
            if r.task_id not in touched:
                continue
            if r.impact is None:
                self.impacts.pop(r.task_id, None)
            else:
                self.impacts[r.task_id] = r.impact
        for task_id in touched:
            t = self.open.get(task_id) or self.final.get(task_id)
            if t is None or t.last_ts is None or t.last_ts < window_start:
                self.final.pop(task_id, None)
                self.open.pop(task_id, None)
                self.impacts.pop(task_id, None)
                continue
            impact = self.impacts.get(task_id)
            summary.add(task_id, t, impact, summary.wasted_task(t, impact, grace_cutoff))
            by_time.add(task_id)
        self.cutoff = grace_cutoff
        self._clock(clock)

    def _clock(self, clock: datetime | None) -> None:
        if clock is not None:
            self.impacts_since = clock - timedelta(seconds=self.settings.impact_lag_seconds)


def _merged(final: dict[str, Task], open_tail: dict[str, Task]) -> dict[str, Task]:
    """The open tail's tasks with their final part added (copies: ``final`` is kept as is)."""
    out = {}
    for task_id, tail in open_tail.items():
        base = final.get(task_id)
        out[task_id] = tail if base is None else base.merged(tail)
    return out


class Priced(NamedTuple):
    family: str
    price: Price | None


Pricer = Callable[[str, str | None, datetime | None], Priced]


class Now(NamedTuple):
    """What a refresh's instant decides for the window's tasks, and how it prices rows."""

    window_start: datetime  # a task whose latest row is older has left the window
    grace_cutoff: datetime  # a task whose latest row is older may count as waste
    priced: Pricer


def pricer(providers: ProviderFamilies, prices: PriceBook) -> Pricer:
    """The provider family and list price of a provider, model and price period, looked up
    once per read for each of them, not per row."""

    @cache
    def priced(provider: str, model: str | None, period: datetime | None) -> Priced:
        family = providers.family(provider)
        return Priced(family, prices.price(family, model_ref(provider, model), period))

    return priced


def _fold(target: dict[str, Task], r: Any, priced: Pricer) -> None:
    task = target.get(r.task_id)
    if task is None:
        task = target[r.task_id] = Task()
    if r.kind == "sum":
        family, price = priced(r.provider, r.model, r.period)
        listed = 0 if price is None else amount(price.value(Sums.of(r)))
        task.add(family, amount(r.cost), int(r.input_tokens + r.output_tokens), listed)
    else:
        task.label(r.last_ts, r.quest, r.layer)
