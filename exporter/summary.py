"""The window families' sums and rankings, kept up to date task by task.

Summing and ranking every window task on every refresh costs what the window holds (hundreds
of milliseconds at 40,000 tasks). Instead each task's contribution is taken out before the task
changes and put back after (``remove`` / ``add``), so a refresh costs what changed: the tasks
with new rows or a new impact, the tasks leaving the window, and those crossing the grace
cutoff (exporter/tasks.py finds them). Every sum is exact (dollars and impacts as integers, see
``amount`` and ``exact``), so taking a contribution out leaves exactly what summing the rest would
give.

A ranking publishes its best few of hundreds of thousands of tasks, so it holds only a few
hundred more than it publishes (``Ranking``), not a key per task.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from exporter.config import Settings
from exporter.incremental import Count

if TYPE_CHECKING:
    from exporter.store import Task

# Every finite float is a multiple of 2**-1074: scaled by 2**1074 it is an exact integer, so
# sums of impacts are exact whatever order tasks come and go in. int / int rounds correctly,
# which is what math.fsum returns for the same floats.
_SCALE_BITS = 1074
AMOUNT_DIGITS = 12
"""An amount is dollars in units of 10**-AMOUNT_DIGITS (the window's SQL sends them so)."""
_PER_DOLLAR = 10**AMOUNT_DIGITS
SPARE = 500
"""How many keys a ranking holds beyond those it publishes: what it can lose (tasks leaving
the window, or ranking worse) before it must look at every task again."""


def exact(value: float) -> int:
    """``value`` as an integer multiple of 2**-1074 (exact for every finite float)."""
    numerator, denominator = value.as_integer_ratio()
    return numerator << (_SCALE_BITS - denominator.bit_length() + 1)


Amount = int | Decimal
"""Dollars in units of 10**-12: an int (a third of a Decimal's memory, and faster to add), or a
Decimal in the same unit for the rare value with finer digits (the sums it enters become
Decimals, still exact)."""


def amount(dollars: Decimal) -> Amount:
    """``dollars`` in units of 10**-12, exactly."""
    scaled = dollars.scaleb(AMOUNT_DIGITS)
    whole = int(scaled)
    return whole if whole == scaled else scaled


def dollars(value: Amount) -> Decimal:
    """An amount back in dollars, exactly."""
    return Decimal(value).scaleb(-AMOUNT_DIGITS)


def quotient(numerator: int, denominator: int = 1) -> float:
    """The float nearest to an exact ratio of integers (int / int rounds correctly), or an
    infinity past the largest float (where int / int raises; a Decimal's float is one)."""
    try:
        return numerator / denominator
    except OverflowError:
        return math.inf if numerator > 0 else -math.inf


def _float(value: Amount) -> float:
    """The float nearest to an amount's dollars (as float() of the same Decimal is)."""
    return quotient(value, _PER_DOLLAR) if isinstance(value, int) else float(dollars(value))


def rounded(total: int) -> float:
    """The float nearest to an exact sum (the same as math.fsum of the summed floats), or an
    infinity past the largest float."""
    return quotient(total, 1 << _SCALE_BITS)


class WindowRow(NamedTuple):
    """One row of the window families, in the shape exporter/sources/window.py reads."""

    kind: str  # efficiency, efficiency_list, waste, waste_total, quest, provider
    task_id: str | None
    quest: str | None
    layer: str | None
    cost: Decimal
    tokens: Decimal | int
    impact: float | None  # a ranked task's (a quest row sums ``impact_exact``)
    tasks: int
    family: str | None
    listed: Decimal = Decimal(0)  # the list-price value of the same tasks' priced calls
    impact_exact: int = 0  # a quest row's impact sum, exact (``exact``): rounded once per label


class Ranking:
    """The ``top`` smallest of many keys, holding at most ``top + spare`` of them.

    Every key added and not removed is either held or larger than ``bound`` (``None``: every
    key is held), so whether a key is held is known without holding the others, and the held
    ones are the smallest. When fewer than ``top`` are held while more were added, ``stale``
    says so, and ``refill`` takes the smallest again from every key. A few hundred keys are
    held: a sorted list is all it takes.
    """

    def __init__(self, top: int, spare: int) -> None:
        self.top, self.keep = top, top + spare
        self.held: list[Any] = []
        self.bound: Any = None
        self.count = 0  # keys added and not removed, held or not

    def add(self, key: Any) -> None:
        self.count += 1
        if self.bound is None or key <= self.bound:
            bisect.insort(self.held, key)
            if len(self.held) > self.keep:
                self.held.pop()
                self.bound = self.held[-1]

    def remove(self, key: Any) -> None:
        """Take out a key that was added (a held one, or one that only counts)."""
        if self.count <= 0:
            raise KeyError(f"taking out a key that was never added: {key!r}")
        if self.bound is None or key <= self.bound:
            at = bisect.bisect_left(self.held, key)
            if at == len(self.held) or self.held[at] != key:
                raise KeyError(f"taking out a key that was never added: {key!r}")
            del self.held[at]
        self.count -= 1

    @property
    def stale(self) -> bool:
        return len(self.held) < min(self.top, self.count)

    def refill(self, keys: Iterable[Any]) -> None:
        """Hold the smallest again, from ``keys``: every key added and not removed."""
        best = heapq.nsmallest(self.keep + 1, keys)
        self.bound = best[self.keep - 1] if len(best) > self.keep else None
        self.held = best[: self.keep]

    def best(self) -> Iterator[Any]:
        yield from self.held[: self.top]


@dataclass(slots=True)
class Group:
    """The sums of a group of tasks: a quest's, a provider family's, or the wasted tasks' of a
    quest and layer (held, or gathered from the tasks one change adds or takes out)."""

    cost: Amount
    tokens: Count
    listed: Amount  # list-price value of the tasks' priced calls
    impact: int  # the tasks' impacts summed exactly (``exact``): a quest's only
    tasks: int


Groups = dict[Any, Group]


Entry = tuple[str, "Task", float | None, bool]
"""A task as a summary takes it: (task_id, task, impact, wasted)."""
Everything = Callable[[], Iterable[Entry]]
"""Every task a summary holds, as ``add`` took it."""


class Summary:
    """Rankings, waste, per-quest and per-provider sums of the tasks added and not removed.

    Ties rank by task_id in code-point order, which is the byte order of UTF-8 (PostgreSQL's
    COLLATE "C"), so rankings do not depend on a locale.
    """

    def __init__(self, settings: Settings) -> None:
        spare = SPARE
        self.min_tokens = settings.waste_min_tokens  # both integers: exact
        self.max_impact = settings.waste_max_impact
        # (-(impact per $), task_id) and (-(impact per list-price $), task_id): the best first
        self.scored = Ranking(settings.top_efficiency_tasks, spare)
        self.scored_list = Ranking(settings.top_efficiency_tasks, spare)
        self.wasted = Ranking(settings.top_waste_tasks, spare)  # (-tokens, task_id)
        self.waste_total: Groups = {}  # (quest, layer) -> its wasted tasks' sums
        self.quest: Groups = {}  # quest -> its tasks' sums
        self.family: Groups = {}  # provider family -> its calls' sums, and the tasks making them

    def wasted_task(self, task: Task, impact: float | None, grace_cutoff: int) -> bool:
        """Spent many tokens for little or no impact, and over for the grace period (its
        cutoff in the store's ``micros``)."""
        quiet = impact is None or impact <= self.max_impact
        assert task.last_us is not None
        return task.tokens > self.min_tokens and quiet and task.last_us < grace_cutoff

    def add(self, tasks: Iterable[Entry]) -> None:
        """Add tasks (a rebuild adds every window task, a steady refresh those it touched)."""
        self._change(tasks, 1)

    def remove(self, tasks: Iterable[Entry]) -> None:
        """Take out exactly what ``add`` put in for the same tasks."""
        self._change(tasks, -1)

    def _keys(
        self, task_id: str, t: Task, impact: float | None, wasted: bool
    ) -> Iterator[tuple[Ranking, Any]]:
        """The rankings a task is in, and its key in each."""
        if impact is not None and impact > 0:
            if t.cost > 0:
                yield self.scored, (-(impact / _float(t.cost)), task_id)
            if t.listed > 0:
                yield self.scored_list, (-(impact / _float(t.listed)), task_id)
        if wasted:
            yield self.wasted, (-t.tokens, task_id)

    def _change(self, tasks: Iterable[Entry], sign: int) -> None:
        """Add (sign 1) or take out (-1) tasks: their rankings change task by task, their
        sums are gathered by group first and each group changes once (a rebuild's half
        million tasks fall into a few hundred groups)."""
        waste: Groups = {}
        quest: Groups = {}
        family: Groups = {}
        keys, change = self._keys, Ranking.add if sign > 0 else Ranking.remove
        for task_id, t, impact, wasted in tasks:
            if wasted or (impact is not None and impact > 0):  # else in no ranking
                for ranking, key in keys(task_id, t, impact, wasted):
                    change(ranking, key)
            cost, tokens, listed = t.cost, t.tokens, t.listed
            if wasted:
                _gather(waste, (t.quest, t.layer), cost, tokens, listed, 0)
            _gather(quest, t.quest, cost, tokens, listed, 0 if impact is None else exact(impact))
            for f, f_cost, f_tokens, f_listed in t.by_family():  # each of its families once
                _gather(family, f, f_cost, f_tokens, f_listed, 0)
        for held, gathered in (
            (self.waste_total, waste),
            (self.quest, quest),
            (self.family, family),
        ):
            for key, group in gathered.items():
                _accumulate(held, key, sign, group)

    def rows(
        self,
        tasks: Callable[[str], Task],
        impacts: Callable[[str], float | None],
        every: Everything,
    ) -> list[WindowRow]:
        """The rows of the window families; ``tasks`` looks up a ranked task by id, and
        ``every`` yields every task added (for a ranking that must look at them again)."""
        for ranking in (self.scored, self.scored_list, self.wasted):
            if ranking.stale:
                ranking.refill(k for t in every() for r, k in self._keys(*t) if r is ranking)

        def ranked(kind: str, ranking: Ranking) -> list[WindowRow]:
            out = []
            for _, task_id in ranking.best():
                t = tasks(task_id)
                impact = impacts(task_id)
                cost, listed = dollars(t.cost), dollars(t.listed)
                row = WindowRow(
                    kind, task_id, t.quest, t.layer, cost, t.tokens, impact, 1, None, listed
                )
                out.append(row)
            return out

        out = ranked("efficiency", self.scored)
        out += ranked("efficiency_list", self.scored_list)
        out += ranked("waste", self.wasted)
        out += [
            _row("waste_total", g, quest=q_, layer=l_) for (q_, l_), g in self.waste_total.items()
        ]
        out += [_row("quest", g, quest=q_) for q_, g in self.quest.items()]
        out += [_row("provider", g, family=f) for f, g in self.family.items()]
        return out


def _row(
    kind: str,
    g: Group,
    quest: str | None = None,
    layer: str | None = None,
    family: str | None = None,
) -> WindowRow:
    """The row of a group's sums."""
    cost, listed = dollars(g.cost), dollars(g.listed)
    return WindowRow(
        kind, None, quest, layer, cost, g.tokens, None, g.tasks, family, listed, g.impact
    )


def _gather(
    groups: Groups,
    key: Any,
    cost: Amount,
    tokens: Count,
    listed: Amount,
    impact: int,
    tasks: int = 1,
) -> None:
    """Add to a group's sums (one task's while gathering, then a gathered group's)."""
    group = groups.get(key)
    if group is None:
        groups[key] = Group(cost, tokens, listed, impact, tasks)
    else:
        group.cost += cost
        group.tokens += tokens
        group.listed += listed
        group.impact += impact
        group.tasks += tasks


def _accumulate(groups: Groups, key: Any, sign: int, g: Group) -> None:
    """Add (sign 1) or take out (-1) a gathered group's sums; a group left with no tasks is
    dropped, as if it had never been summed."""
    if sign > 0:  # adds tasks: a group held keeps some
        _gather(groups, key, g.cost, g.tokens, g.listed, g.impact, g.tasks)
        return
    held = groups.get(key)
    if held is None:
        raise KeyError(f"taking out a group that was never added: {key!r}")
    _gather(groups, key, -g.cost, -g.tokens, -g.listed, -g.impact, -g.tasks)
    if held.tasks == 0:
        del groups[key]
