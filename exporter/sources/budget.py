"""Today's budget per quest: the allocation, and today's spend against it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import psycopg
from prometheus_client.metrics_core import Metric as Family

from exporter import catalog as c
from exporter.families import LabelGuard, Series, as_float, family_of
from exporter.queries import Query
from exporter.sources.base import Build, Excluded, Refresh, Source, Statement
from exporter.sources.spend import SpendSource

BUDGET_TODAY = Query(
    "budget_today",
    """
    SELECT b.quest,
           sum(b.allocated_usd) FILTER (WHERE b.allocated_usd >= 0
                                        AND b.allocated_usd < 'Infinity') AS allocated,
           count(*) FILTER (WHERE b.allocated_usd IS NULL OR NOT (b.allocated_usd >= 0
                                        AND b.allocated_usd < 'Infinity')) AS excluded
    FROM quest_budget_allocations b
    WHERE b.day = %(today)s
    GROUP BY b.quest
    """,
)


class BudgetSource(Source):
    """Today's allocation per quest, and the utilization of it by today's spend."""

    queries = (BUDGET_TODAY.name,)
    feeds = (c.BUDGET_ALLOCATED, c.BUDGET_UTILIZATION)
    exclusions = (("quest_budget_allocations", "invalid_allocation"),)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._rows: list[Any] | None = None

    def statement(self, query: str, refresh: Refresh) -> Statement:
        return Statement(BUDGET_TODAY.sql, refresh.instants.params())

    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        statement = self.statement(query, refresh)
        self._rows = cur.execute(statement.sql, statement.params).fetchall()

    @property
    def has_data(self) -> bool:
        return self._rows is not None

    def weigh(self, labels: LabelGuard) -> None:
        for r in self._rows or ():
            labels.weigh_quest(r.quest)

    def allocated(self, labels: LabelGuard) -> Series:
        """Today's valid allocation per folded quest."""
        allocated: Series = defaultdict(float)
        for r in self._rows or ():
            if r.allocated is not None:
                allocated[(labels.q(r.quest),)] += as_float(r.allocated)
        return allocated

    def build(self, build: Build) -> list[Family]:
        allocated = self.allocated(build.labels)
        spend = build.source(SpendSource)
        today = spend.today(build.labels) if spend is not None else {}
        utilization = {
            key: today.get(key, 0.0) / budget for key, budget in allocated.items() if budget > 0
        }
        return [
            family_of(c.BUDGET_ALLOCATED, allocated),
            family_of(c.BUDGET_UTILIZATION, utilization),
        ]

    def excluded(self) -> Excluded:
        out: Excluded = dict.fromkeys(self.exclusions, 0.0)
        for r in self._rows or ():
            out[self.exclusions[0]] += r.excluded
        return out
