"""Budgets per quest: today's and this month's allocations, and the spend against them."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import psycopg
from prometheus_client.metrics_core import Metric as Family

from exporter import catalog as c
from exporter.families import LabelGuard, Series, as_float
from exporter.queries import Query
from exporter.sources.base import Build, Excluded, Refresh, Source, Statement
from exporter.sources.spend import SpendSource

# This month's allocation rows per quest: today's, the month to date (from the 1st to today
# inclusive) and the whole month (days ahead included: budgets are planned ahead). A row that
# is NULL, negative, NaN or infinite is left out of all three and counted.
_VALID = "b.allocated_usd >= 0 AND b.allocated_usd < 'Infinity'"
BUDGET_TODAY = Query(
    "budget_today",
    f"""
    SELECT b.quest,
           sum(b.allocated_usd) FILTER (WHERE {_VALID} AND b.day = %(today)s) AS allocated,
           sum(b.allocated_usd) FILTER (WHERE {_VALID} AND b.day <= %(today)s) AS to_date,
           sum(b.allocated_usd) FILTER (WHERE {_VALID}) AS month,
           count(*) FILTER (WHERE b.allocated_usd IS NULL OR NOT ({_VALID})) AS excluded
    FROM quest_budget_allocations b
    WHERE b.day BETWEEN %(month_first)s AND %(month_last)s
    GROUP BY b.quest
    """,
)


class BudgetSource(Source):
    """Today's and this month's allocations per quest, and today's utilization."""

    queries = (BUDGET_TODAY.name,)
    feeds = (
        c.BUDGET_ALLOCATED,
        c.BUDGET_UTILIZATION,
        c.BUDGET_ALLOCATED_MONTH_TO_DATE,
        c.BUDGET_ALLOCATED_MONTH,
        c.BUDGET_MONTH_END,
    )
    exclusions = (("quest_budget_allocations", "invalid_allocation"),)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._rows: list[Any] | None = None
        self._month_end: float | None = None

    def statement(self, query: str, refresh: Refresh) -> Statement:
        return Statement(BUDGET_TODAY.sql, refresh.instants.params())

    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        statement = self.statement(query, refresh)
        self._rows = cur.execute(statement.sql, statement.params).fetchall()
        self._month_end = refresh.instants.month_end.timestamp()

    @property
    def has_data(self) -> bool:
        return self._rows is not None

    def weigh(self, labels: LabelGuard) -> None:
        for r in self._rows or ():
            labels.weigh_budget(r.quest, as_float(r.allocated))

    def allocated(self, labels: LabelGuard, column: str = "allocated") -> Series:
        """Today's valid allocation per folded quest (``column``: to_date, month: this month's)."""
        allocated: Series = defaultdict(float)
        for r in self._rows or ():
            value = getattr(r, column)
            if value is not None:
                allocated[(labels.q(r.quest),)] += as_float(value)
        return allocated

    def build(self, build: Build) -> list[Family]:
        allocated = self.allocated(build.labels)
        spend = build.source(SpendSource)
        today = spend.today(build.labels) if spend is not None else {}
        utilization = {
            key: today.get(key, 0.0) / budget for key, budget in allocated.items() if budget > 0
        }
        return [
            build.family(c.BUDGET_ALLOCATED, allocated),
            build.family(c.BUDGET_UTILIZATION, utilization),
            build.family(c.BUDGET_ALLOCATED_MONTH_TO_DATE, self.allocated(build.labels, "to_date")),
            build.family(c.BUDGET_ALLOCATED_MONTH, self.allocated(build.labels, "month")),
            build.family(c.BUDGET_MONTH_END, {(): self._month_end or 0.0}),
        ]

    def excluded(self) -> Excluded:
        out: Excluded = dict.fromkeys(self.exclusions, 0.0)
        for r in self._rows or ():
            out[self.exclusions[0]] += r.excluded
        return out
