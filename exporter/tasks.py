"""Per-task lifetime sums of the window's tasks, kept so a refresh reads only the new rows.

The window families rank, sum and classify the tasks with a valid row in the window by what
each spent over its whole life. Reading that from the ledger every refresh costs the window
plus every earlier row of long-running tasks. Instead the exporter keeps, per window task, the
sums over ids <= a watermark (the same snapshot-safe watermark as the cumulative sums, see
exporter/incremental.py) and re-reads the rows after it; a task that enters the window (a new
task, or an old one with a new row) has its history read once. Tasks leave when their latest
row falls out of the window. The periodic full reconciliation rebuilds everything.
"""

from __future__ import annotations

import heapq
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any, NamedTuple

from exporter.config import Settings
from exporter.incremental import Plan, Sums
from exporter.labels import ProviderFamilies
from exporter.models import model_ref
from exporter.prices import Price, PriceBook


@dataclass(slots=True)
class Task:
    """One task's valid spend, by provider family, and its latest valid row's labels.

    Kept small (tens of thousands are held): most tasks use one provider family, so the
    per-family split is a dict only for the few that use several.
    """

    cost: Decimal = Decimal(0)
    tokens: int = 0
    listed: Decimal = Decimal(0)  # list-price value of its priced calls
    last_ts: datetime | None = None
    quest: str | None = None
    layer: str | None = None
    family: str | None = None  # the only family so far (None: none yet, or several)
    shares: dict[str, list[Any]] | None = None  # family -> [cost, tokens, listed], once several

    def add(self, family: str, cost: Decimal, tokens: int, listed: Decimal) -> None:
        if self.shares is None and self.family != family:
            if self.family is None:  # the first sum of this task
                self.family = family
            else:
                self.shares = {self.family: [self.cost, self.tokens, self.listed]}
                self.family = None
        if self.shares is not None:
            acc = self.shares.setdefault(family, [Decimal(0), 0, Decimal(0)])
            acc[0] += cost
            acc[1] += tokens
            acc[2] += listed
        self.cost += cost
        self.tokens += tokens
        self.listed += listed

    def by_family(self) -> Iterable[tuple[str, Decimal, int, Decimal]]:
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


class WindowRow(NamedTuple):
    """One row of the window families, in the shape exporter/families.py reads."""

    kind: str  # efficiency, efficiency_list, waste, waste_total, quest, provider
    task_id: str | None
    quest: str | None
    layer: str | None
    cost: Decimal
    tokens: Decimal | int
    impact: float | None
    tasks: int
    family: str | None
    listed: Decimal = Decimal(0)  # the list-price value of the same tasks' priced calls


@dataclass
class WindowTasks:
    """The final part of every window task's sums, and the watermark it is exact up to."""

    final: dict[str, Task] = field(default_factory=dict)
    frozen_id: int = -1

    def bounds(self, plan: Plan) -> tuple[bool, int]:
        """Return (full, safe): whether to rebuild, and the id up to which rows are final.

        A steady statement reads the ids after ``frozen_id``. Rebuild at a reconciliation, and
        while nothing is final yet (the first refresh of an exporter has no watermark): a tail
        from id -1 would be the whole ledger.
        """
        return plan.full or self.frozen_id < 0, max(plan.safe, self.frozen_id)

    def tracked(self) -> str:
        """The tasks the final part holds, as the JSON array the steady statement reads."""
        return json.dumps(list(self.final))

    def apply(
        self,
        plan: Plan,
        rows: Iterable[Any],
        window_start: datetime,
        providers: ProviderFamilies,
        prices: PriceBook,
    ) -> tuple[dict[str, Task], dict[str, float | None]]:
        """Fold one statement's rows in; return the window's tasks and their impacts.

        ``rows`` may be a stream that fails part way: nothing held changes until it is read to
        the end. A rebuild folds rows as they arrive into new dicts; a steady refresh keeps its
        few tail rows until then, and folds them by part (final before open, ids growing).
        """
        full, safe = self.bounds(plan)

        @cache
        def priced(provider: str, model: str | None, period: datetime | None) -> _Priced:
            family = providers.family(provider)
            return _Priced(family, prices.price(family, model_ref(provider, model), period))

        final: dict[str, Task] = {}
        open_tail: dict[str, Task] = {}
        impacts: dict[str, float | None] = {}
        later: list[Any] = []
        for r in rows:
            if r.kind == "impact":
                impacts[r.task_id] = r.impact
            elif full:
                _fold(final if r.part == 0 else open_tail, r, priced)
            else:
                later.append(r)
        if not full:
            final = self.final
            for r in sorted(later, key=lambda r: r.part):
                _fold(final if r.part < 2 else open_tail, r, priced)
        # One pass over what is held: tasks whose latest row left the window are dropped.
        current = {
            k: t for k, t in final.items() if t.last_ts is not None and t.last_ts >= window_start
        }
        for task_id, tail in open_tail.items():
            base = final.get(task_id)
            task = tail if base is None else base.merged(tail)
            if task.last_ts is not None and task.last_ts >= window_start:
                current[task_id] = task
        for task_id in [k for k in final if k not in current]:
            del final[task_id]
        self.final = final
        self.frozen_id = safe
        return current, impacts


class _Priced(NamedTuple):
    family: str
    price: Price | None


def _fold(target: dict[str, Task], r: Any, priced: Callable[..., _Priced]) -> None:
    task = target.get(r.task_id)
    if task is None:
        task = target[r.task_id] = Task()
    if r.kind == "sum":
        # Looked up once per provider, model and period, not per row.
        family, price = priced(r.provider, r.model, r.period)
        listed = Decimal(0) if price is None else price.value(Sums.of(r))
        task.add(family, r.cost, int(r.input_tokens + r.output_tokens), listed)
    else:
        task.label(r.last_ts, r.quest, r.layer)


def summarize(
    tasks: dict[str, Task],
    impacts: dict[str, float | None],
    settings: Settings,
    grace_cutoff: datetime,
) -> list[WindowRow]:
    """Rankings, waste, per-quest and per-provider sums of the window's tasks.

    Ties rank by task_id in code-point order, which is the byte order of UTF-8 (PostgreSQL's
    COLLATE "C"), so rankings do not depend on a locale.
    """
    scored = []
    scored_list = []
    wasted = []
    waste_total: dict[tuple[Any, Any], list[Any]] = {}
    quest: dict[Any, list[Any]] = {}
    family_sum: dict[str, list[Any]] = {}
    zero = Decimal(0)
    min_tokens = settings.waste_min_tokens  # both integers: exact
    max_impact = settings.waste_max_impact
    get_impact = impacts.get
    for task_id, t in tasks.items():
        cost, tokens = t.cost, t.tokens
        impact = get_impact(task_id)
        if impact is not None and impact > 0:
            if cost > zero:
                scored.append((-(impact / float(cost)), task_id))
            if t.listed > zero:
                scored_list.append((-(impact / float(t.listed)), task_id))
        quiet = impact is None or impact <= max_impact
        if tokens > min_tokens and quiet and t.last_ts < grace_cutoff:  # type: ignore[operator]
            wasted.append((-tokens, task_id))
            acc = waste_total.get((t.quest, t.layer))
            if acc is None:
                waste_total[(t.quest, t.layer)] = [cost, tokens, 1, t.listed]
            else:
                acc[0] += cost
                acc[1] += tokens
                acc[2] += 1
                acc[3] += t.listed
        q = quest.get(t.quest)
        if q is None:
            q = quest[t.quest] = [zero, 0, [], 0]
        q[0] += cost
        q[1] += tokens
        if impact is not None:
            q[2].append(impact)
        q[3] += 1
        for family, p_cost, p_tokens, p_listed in t.by_family():
            f = family_sum.get(family)
            if f is None:
                f = family_sum[family] = [zero, 0, 0, zero]
            f[0] += p_cost
            f[1] += p_tokens
            f[2] += 1  # a task yields each of its families once
            f[3] += p_listed

    def ranked(kind: str, top: int, candidates: list[tuple[Any, str]]) -> list[WindowRow]:
        rows = []
        for _, task_id in heapq.nsmallest(top, candidates):
            t = tasks[task_id]
            impact = impacts.get(task_id)
            rows.append(
                WindowRow(
                    kind, task_id, t.quest, t.layer, t.cost, t.tokens, impact, 1, None, t.listed
                )
            )
        return rows

    out = ranked("efficiency", settings.top_efficiency_tasks, scored)
    out += ranked("efficiency_list", settings.top_efficiency_tasks, scored_list)
    out += ranked("waste", settings.top_waste_tasks, wasted)
    out += [
        WindowRow("waste_total", None, q_, l_, cost, tokens, None, n, None, listed)
        for (q_, l_), (cost, tokens, n, listed) in waste_total.items()
    ]
    out += [
        # fsum: the same total whatever order the tasks were folded in
        WindowRow("quest", None, q_, None, cost, tokens, math.fsum(i) if i else None, n, None)
        for q_, (cost, tokens, i, n) in quest.items()
    ]
    out += [
        WindowRow("provider", None, None, None, cost, tokens, None, n, f, listed)
        for f, (cost, tokens, n, listed) in family_sum.items()
    ]
    return out
