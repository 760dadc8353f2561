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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any, NamedTuple

from exporter.config import Settings
from exporter.incremental import Count, Plan, count
from exporter.labels import ProviderFamilies
from exporter.models import model_ref
from exporter.prices import MILLION, Price, PriceBook
from exporter.store import Task, Tasks, TaskStore, from_micros, micros
from exporter.summary import Amount, Entry, Summary, WindowRow, amount


@dataclass
class WindowTasks:
    """Every window task's sums, its latest impact, and the summary ranked from them.

    ``final`` holds every task held: its sums over ids <= ``frozen_id`` (none yet for a task
    whose rows are all after it), its latest impact, and an index by its latest final row.
    ``open`` holds the tasks with rows after ``frozen_id`` as of the last refresh (their final
    part merged with those rows: the state the summary holds for them). Every task held is in
    the window and in ``summary``.
    """

    settings: Settings
    final: TaskStore = field(default_factory=TaskStore)
    open: dict[str, Task] = field(default_factory=dict)
    frozen_id: int = -1
    impacts_since: datetime | None = None
    """A steady refresh reads the impacts measured after this (the database's clock at the
    last refresh, less ``impact_lag_seconds``)."""
    summary: Summary = field(init=False)
    cutoff: int | None = None  # the grace cutoff ``summary`` classified waste with (micros)

    def __post_init__(self) -> None:
        self.summary = Summary(self.settings)

    def bounds(self, plan: Plan) -> tuple[bool, int]:
        """Return (full, safe): whether to rebuild, and the id up to which rows are final.

        A steady statement reads the ids after ``frozen_id``. Rebuild at a reconciliation, and
        while nothing is final yet (an exporter's first refresh, unless its watermark was
        seeded, and the one after it): a tail from id -1 would be the whole ledger.
        """
        return plan.full or self.frozen_id < 0, max(plan.safe, self.frozen_id)

    def entering(self, tail: Iterable[Any]) -> str:
        """The tail's tasks not held (new, or back in the window), as the JSON array the
        history statement reads: their earlier rows are read once."""
        return json.dumps(sorted(k for k in {r.task_id for r in tail} if k not in self.final))

    def task(self, task_id: str) -> Task:
        """A held task as the summary counts it."""
        task = self.open.get(task_id) or self.final.get(task_id)
        assert task is not None, task_id
        return task

    def rows(self) -> list[WindowRow]:
        return self.summary.rows(self.task, self.final.impact, self._every)

    def _every(self) -> Iterator[tuple[str, Task, float | None, bool]]:
        """Every held task as the summary took it."""
        assert self.cutoff is not None  # set by every rebuild and steady refresh
        for task_id, t, impact in self.final.items():
            t = self.open.get(task_id) or t
            yield task_id, t, impact, self.summary.wasted_task(t, impact, self.cutoff)

    def rebuild(self, plan: Plan, rows: Iterable[Any], now: Now) -> None:
        """Replace everything held by a rebuild's rows (parts 0 and 2, and every window
        task's impact).

        What was held is dropped first, so that the window's tasks are never held twice: the
        source keeps publishing its last rows if ``rows`` (a stream) fails part way, and the
        next refresh rebuilds again. While nothing is final (``safe`` < 0) the next refresh
        rebuilds anyway, so every row is folded into ``final``, which holds tasks compactly.
        """
        window_start, grace_cutoff, priced = now
        expected = len(self.final)
        self.final, self.open = TaskStore(), {}
        self.summary, self.frozen_id = Summary(self.settings), -1
        final, open_tail = TaskStore(expected), Tasks()
        all_final = self.bounds(plan)[1] < 0
        clock = None
        for r in rows:
            if r.kind == "clock":
                clock = r.last_us
                continue
            _fold(final if r.part == 0 or all_final else open_tail, r, priced)
            if r.kind == "label" and r.impact is not None:  # on every label row of the task
                final.set_impact(r.task_id, r.impact)
        opened = _merged(final, open_tail)
        for task_id in opened:
            final.ensure(task_id)
        self.summary.add(_kept(final, opened, final.items(), now, self.summary))
        final.forget_before(window_start)
        self.final, self.open = final, opened
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
        clock = next((r.last_us for r in history if r.kind == "clock"), None)
        final = self.final
        touched = set(self.open)  # re-derived from this tail
        touched.update(r.task_id for r in sums)
        touched.update(r.task_id for r in impacts if r.task_id in final)
        # Time moves too: tasks whose latest row left the window, or crossed the grace cutoff
        # (either way, if the clock stepped back). A task in ``open`` is touched anyway.
        touched.update(final.within(None, window_start))
        low, high = sorted((old_cutoff, grace_cutoff))
        touched.update(final.within(low, high))

        summary = self.summary

        def held() -> Iterator[Entry]:  # as the summary holds them
            for task_id in touched:
                if task_id in final:
                    t, impact = self.task(task_id), final.impact(task_id)
                    yield task_id, t, impact, summary.wasted_task(t, impact, old_cutoff)

        summary.remove(held())
        open_tail = Tasks()
        for r in sorted(sums, key=lambda r: r.part):  # final before open, ids growing
            _fold(final if r.part < 2 else open_tail, r, priced)
        self.open = _merged(final, open_tail)
        for task_id in self.open:
            final.ensure(task_id)
        for r in impacts:
            if r.task_id in touched:
                final.set_impact(r.task_id, r.impact)
        touched_now = ((k, final.get(k), final.impact(k)) for k in touched)
        summary.add(_kept(final, self.open, touched_now, now, summary))
        final.forget_before(window_start)
        self.cutoff = grace_cutoff
        self._clock(clock)

    def _clock(self, clock: int | None) -> None:
        """Take the database's clock (``micros``) of a refresh."""
        if clock is not None:
            lag = timedelta(seconds=self.settings.impact_lag_seconds)
            self.impacts_since = from_micros(clock) - lag


def _kept(
    final: TaskStore,
    opened: dict[str, Task],
    tasks: Iterable[tuple[str, Task | None, float | None]],
    now: Now,
    summary: Summary,
) -> Iterator[Entry]:
    """``tasks`` (id, final part, impact) as ``summary`` takes them, each with its open part
    if it has one; a task whose latest row left the window is dropped from ``final`` and
    ``opened`` instead."""
    for task_id, t, impact in tasks:
        t = opened.get(task_id) or t
        if t is None or t.last_us is None or t.last_us < now.window_start:
            final.pop(task_id)
            opened.pop(task_id, None)
            continue
        yield task_id, t, impact, summary.wasted_task(t, impact, now.grace_cutoff)


def _merged(final: TaskStore, open_tail: Tasks) -> dict[str, Task]:
    """The open tail's tasks with their final part added (copies: ``final`` is kept as is)."""
    out = {}
    for task_id, tail in open_tail.items():
        base = final.get(task_id)
        out[task_id] = tail if base is None else base.merged(tail)
    return out


Lister = Callable[[Count, Count, Count, Count], Amount]
"""The list price of token sums: input, output, cache read, cache write."""


class Priced(NamedTuple):
    family: str
    listed: Lister  # in summary's units (0: no price)


Pricer = Callable[[str, str | None, datetime | None], Priced]


class Now(NamedTuple):
    """What a refresh's instant decides for the window's tasks, and how it prices rows."""

    window_start: int  # a task whose latest row is older has left the window (micros)
    grace_cutoff: int  # a task whose latest row is older may count as waste (micros)
    priced: Pricer

    @classmethod
    def at(cls, window_start: datetime, grace_cutoff: datetime, priced: Pricer) -> Now:
        return cls(micros(window_start), micros(grace_cutoff), priced)


def pricer(providers: ProviderFamilies, prices: PriceBook) -> Pricer:
    """The provider family and list price of a provider, model and price period, looked up
    once per read for each of them, not per row."""

    @cache
    def priced(provider: str, model: str | None, period: datetime | None) -> Priced:
        family = providers.family(provider)
        return Priced(family, lister(prices.price(family, model_ref(provider, model), period)))

    return priced


def lister(price: Price | None) -> Lister:
    """The list price of token sums (input, output, cache read, cache write), exactly, in
    summary's units: the tokens times each price per token in those units, an int for a
    price per million tokens with at most six decimals (the catalogue's), else a Decimal. The
    formula of ``Price.value``, written again: a rebuild prices about a row a task, and
    Decimals in dollars took a third of its fold (a test holds the two equal)."""
    if price is None:
        return lambda i, o, cr, cw: 0
    per_million = (price.input, price.output, price.cache_read, price.cache_write)
    pi, po, pcr, pcw = (amount(p / MILLION) for p in per_million)
    return lambda i, o, cr, cw: i * pi + o * po + cr * pcr + cw * pcw


def _fold(target: TaskStore | Tasks, r: Any, priced: Pricer) -> None:
    if r.kind == "label":
        target.label(r.task_id, r.last_us, r.quest, r.layer)
        return
    family, listed = priced(r.provider, r.model, r.period)
    if r.cost_i8 is not None:  # whole numbers within int64 (window._crossing): the usual case
        i, o = r.input_tokens_i8, r.output_tokens_i8
        cr, cw = r.cache_read_tokens_i8, r.cache_write_tokens_i8
        target.add(r.task_id, family, r.cost_i8, i + o, listed(i, o, cr, cw))
    else:
        # Exact, as the running sums count them: a numeric column's fraction is kept.
        sums = (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens)
        i, o, cr, cw = (count(t or 0) for t in sums)
        target.add(r.task_id, family, amount(r.cost), i + o, listed(i, o, cr, cw))
