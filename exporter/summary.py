"""The window families' sums and rankings, kept up to date task by task.

Summing and ranking every window task on every refresh costs what the window holds (hundreds
of milliseconds at 40,000 tasks). Instead each task's contribution is taken out before the task
changes and put back after (``remove`` / ``add``), so a refresh costs what changed: the tasks
with new rows or a new impact, the tasks leaving the window, and those crossing the grace
cutoff (exporter/tasks.py finds them). Every sum is exact (Decimal and int, and the impacts as
integers), so taking a contribution out leaves exactly what summing the rest would give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from sortedcontainers import SortedList

from exporter.config import Settings

if TYPE_CHECKING:
    from exporter.tasks import Task

# Every finite float is a multiple of 2**-1074: scaled by 2**1074 it is an exact integer, so
# sums of impacts are exact whatever order tasks come and go in. int / int rounds correctly,
# which is what math.fsum returns for the same floats.
_SCALE_BITS = 1074
_ZERO = Decimal(0)


def exact(value: float) -> int:
    """``value`` as an integer multiple of 2**-1074 (exact for every finite float)."""
    numerator, denominator = value.as_integer_ratio()
    return numerator << (_SCALE_BITS - denominator.bit_length() + 1)


def rounded(total: int) -> float:
    """The float nearest to an exact sum (the same as math.fsum of the summed floats), or an
    infinity past the largest float."""
    try:
        return total / (1 << _SCALE_BITS)
    except OverflowError:
        return math.inf if total > 0 else -math.inf


class WindowRow(NamedTuple):
    """One row of the window families, in the shape exporter/sources/window.py reads."""

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


class Summary:
    """Rankings, waste, per-quest and per-provider sums of the tasks added and not removed.

    Ties rank by task_id in code-point order, which is the byte order of UTF-8 (PostgreSQL's
    COLLATE "C"), so rankings do not depend on a locale.
    """

    def __init__(self, settings: Settings) -> None:
        self.top_efficiency = settings.top_efficiency_tasks
        self.top_waste = settings.top_waste_tasks
        self.min_tokens = settings.waste_min_tokens  # both integers: exact
        self.max_impact = settings.waste_max_impact
        # (-(impact per $), task_id): the best first
        self.scored: SortedList = SortedList()
        self.scored_list: SortedList = SortedList()
        self.wasted: SortedList = SortedList()  # (-tokens, task_id)
        # (quest, layer) -> [cost, tokens, tasks, listed] of the wasted tasks
        self.waste_total: dict[tuple[str | None, str | None], list[Any]] = {}
        # quest -> [cost, tokens, exact impact sum, measured tasks, tasks]
        self.quest: dict[str | None, list[Any]] = {}
        # provider family -> [cost, tokens, tasks, listed]
        self.family: dict[str, list[Any]] = {}

    def wasted_task(self, task: Task, impact: float | None, grace_cutoff: datetime) -> bool:
        """Spent many tokens for little or no impact, and over for the grace period."""
        quiet = impact is None or impact <= self.max_impact
        assert task.last_ts is not None
        return task.tokens > self.min_tokens and quiet and task.last_ts < grace_cutoff

    def add(self, task_id: str, task: Task, impact: float | None, wasted: bool) -> None:
        self._change(task_id, task, impact, wasted, 1, SortedList.add)

    def remove(self, task_id: str, task: Task, impact: float | None, wasted: bool) -> None:
        """Take out exactly what ``add`` put in for the same arguments."""
        self._change(task_id, task, impact, wasted, -1, SortedList.remove)

    def fill(self, tasks: Iterable[tuple[str, Task, float | None, bool]]) -> None:
        """``add`` every one of ``tasks`` to this empty summary: a rebuild's hundreds of
        thousands of ranking keys are sorted once, not inserted one by one."""
        assert not (self.scored or self.scored_list or self.wasted or self.quest)
        keys: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        self.scored, self.scored_list, self.wasted = keys
        for task_id, task, impact, wasted in tasks:
            self._change(task_id, task, impact, wasted, 1, list.append)
        self.scored, self.scored_list, self.wasted = (SortedList(k) for k in keys)

    def _change(
        self,
        task_id: str,
        t: Task,
        impact: float | None,
        wasted: bool,
        sign: int,
        update: Callable[[Any, Any], None],
    ) -> None:
        cost, tokens, listed = t.cost, t.tokens, t.listed
        if impact is not None and impact > 0:
            if cost > _ZERO:
                update(self.scored, (-(impact / float(cost)), task_id))
            if listed > _ZERO:
                update(self.scored_list, (-(impact / float(listed)), task_id))
        if wasted:
            update(self.wasted, (-tokens, task_id))
            _accumulate(self.waste_total, (t.quest, t.layer), sign, cost, tokens, 1, listed)
        _accumulate(
            self.quest,
            t.quest,
            sign,
            cost,
            tokens,
            0 if impact is None else exact(impact),
            0 if impact is None else 1,
            1,
            count=4,
        )
        for family, f_cost, f_tokens, f_listed in t.by_family():
            # a task yields each of its families once
            _accumulate(self.family, family, sign, f_cost, f_tokens, 1, f_listed, count=2)

    def rows(self, tasks: Any, impacts: Mapping[str, float]) -> list[WindowRow]:
        """The rows of the window families; ``tasks`` looks up a ranked task by id."""

        def ranked(kind: str, top: int, candidates: SortedList) -> list[WindowRow]:
            out = []
            for _, task_id in candidates.islice(0, top):
                t = tasks(task_id)
                impact = impacts.get(task_id)
                out.append(
                    WindowRow(
                        kind, task_id, t.quest, t.layer, t.cost, t.tokens, impact, 1, None, t.listed
                    )
                )
            return out

        out = ranked("efficiency", self.top_efficiency, self.scored)
        out += ranked("efficiency_list", self.top_efficiency, self.scored_list)
        out += ranked("waste", self.top_waste, self.wasted)
        out += [
            WindowRow("waste_total", None, q_, l_, cost, tokens, None, n, None, listed)
            for (q_, l_), (cost, tokens, n, listed) in self.waste_total.items()
        ]
        out += [
            WindowRow("quest", None, q_, None, cost, tokens, rounded(i) if m else None, n, None)
            for q_, (cost, tokens, i, m, n) in self.quest.items()
        ]
        out += [
            WindowRow("provider", None, None, None, cost, tokens, None, n, f, listed)
            for f, (cost, tokens, n, listed) in self.family.items()
        ]
        return out


def _accumulate(
    groups: dict[Any, list[Any]], key: Any, sign: int, *values: Any, count: int = 2
) -> None:
    """Add (sign 1) or take out (-1) ``values`` of one group; ``values[count]`` counts its
    tasks, and a group left with none is dropped, as if it had never been summed."""
    acc = groups.get(key)
    if acc is None:
        if sign < 0:
            raise KeyError(f"taking out a group that was never added: {key!r}")
        groups[key] = list(values)
        return
    for i, value in enumerate(values):
        if sign > 0:
            acc[i] += value
        else:
            acc[i] -= value
    if acc[count] == 0:
        del groups[key]
