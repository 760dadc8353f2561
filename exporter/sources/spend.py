"""Spend, tokens and calls: cumulative counters over the whole ledger, and today's spend.

Two statements: SPEND_TOTALS folds the rows after the watermark into exact running sums
(exporter/incremental.py), SPEND_RECENT reads what depends on time (the window's and today's
spend per series, the newest call). The cumulative families join the two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client.metrics_core import Metric as Family

from exporter import catalog as c
from exporter.families import LabelGuard, Series, as_float, family_of
from exporter.incremental import ZERO, Plan, Sums
from exporter.queries import COST, COST_ROW_CHECKS, EXCLUSION_REASON, VALID, Query
from exporter.sources.base import Build, Excluded, Refresh, Source, Statement

# Cumulative sums of the rows after id %(after)s (an index range scan of the primary key), split
# into rows that are final (id <= %(safe)s: folded into the exporter's running totals) and the
# tail (added to them for this refresh only). after = NULL recomputes the whole ledger (any id,
# negative ones too): the range test then folds away when the statement is planned (every
# statement is planned with its parameters), so a full scan tests no id per row.
#
# One hash aggregate over (final, quest, layer, provider, valid): grouping by columns and
# booleans lets the planner estimate a few thousand groups and aggregate in parallel (a CASE
# that nulls the provider of excluded rows would hash one key fewer, but the planner estimates
# such an expression at one group per row and gives up parallelism). Grouping every row by the
# exclusion reason made it guess one group per row and sort the whole ledger, so the reasons
# come from a second, filtered scan that runs only when the first one saw excluded rows (an init
# plan the executor checks before starting that scan). The largest id is read from the end of
# the primary key, not aggregated over every row.
_AFTER = "(%(after)s::bigint IS NULL OR c.id > %(after)s)"
SPEND_TOTALS = Query(
    "spend_totals",
    f"""
    WITH g AS MATERIALIZED (
        SELECT c.id <= %(safe)s AS final, c.quest, c.layer, c.provider, {VALID} IS TRUE AS valid,
               count(*) AS calls,
               sum({COST}) AS cost,
               sum(c.input_tokens) AS input_tokens,
               sum(c.output_tokens) AS output_tokens
        FROM cost_ledger c
        WHERE {_AFTER}
        GROUP BY 1, 2, 3, 4, 5
    )
    SELECT 'sum' AS kind, final, quest, layer, provider, NULL AS reason,
           calls, cost, input_tokens, output_tokens, NULL::bigint AS max_id
    FROM g
    WHERE valid
    UNION ALL
    SELECT 'sum', c.id <= %(safe)s, c.quest, c.layer, c.provider, {EXCLUSION_REASON},
           count(*), NULL, NULL, NULL, NULL
    FROM cost_ledger c
    WHERE EXISTS (SELECT FROM g WHERE NOT g.valid)
      AND {_AFTER} AND {VALID} IS NOT TRUE
    GROUP BY 1, 2, 3, 4, 5, 6
    UNION ALL
    SELECT 'largest', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT max(c.id) FROM cost_ledger c WHERE {_AFTER})
    """,
)

# What depends on time, not on the history: the window's spend (the label guard's weights) and
# today's, from the ts index; and the newest valid call, from the end of that index.
SPEND_RECENT = Query(
    "spend_recent",
    f"""
    SELECT 'series' AS kind, c.quest, c.layer, c.provider,
           sum({COST}) AS cost_window,
           sum({COST}) FILTER (WHERE c.ts >= %(today_start)s) AS cost_today,
           NULL::timestamptz AS last_ts
    FROM cost_ledger c
    WHERE c.ts >= %(window_start)s AND {VALID}
    GROUP BY c.quest, c.layer, c.provider
    UNION ALL
    SELECT 'newest', NULL, NULL, NULL, NULL, NULL,
           (SELECT c.ts FROM cost_ledger c WHERE {VALID} ORDER BY c.ts DESC LIMIT 1)
    """,
)

Key = tuple[Any, Any, Any, Any]  # quest, layer, provider, exclusion reason (None: valid)


@dataclass(frozen=True)
class SpendRow:
    """One series of the whole ledger: its running sums and its recent spend."""

    quest: str | None
    layer: str | None
    provider: str | None
    reason: str | None  # why these rows were excluded; None: valid rows
    sums: Sums
    cost_window: Decimal | None
    cost_today: Decimal | None


@dataclass
class SpendTotals:
    """Running totals of ``cost_ledger`` by id: final sums plus this refresh's tail."""

    final: dict[Key, Sums] = field(default_factory=dict)
    totals: dict[Key, Sums] = field(default_factory=dict)
    read: bool = False  # whether any refresh has folded a whole ledger yet

    def apply(self, plan: Plan, rows: Iterable[Any]) -> int | None:
        """Fold the rows of SPEND_TOTALS read under ``plan``; return the largest id seen.

        Nothing changes unless every row folds: a row that cannot leaves the totals as they were.
        """
        final = {} if plan.full else dict(self.final)
        tail: dict[Key, Sums] = {}
        largest = None
        for r in rows:
            if r.kind == "largest":
                largest = r.max_id
                continue
            _add(final if r.final else tail, (r.quest, r.layer, r.provider, r.reason), r)
        totals = dict(final)
        for key, sums in tail.items():
            totals[key] = totals.get(key, ZERO) + sums
        self.final, self.totals = final, totals
        self.read = self.read or plan.full
        return largest


def _add(target: dict[Key, Sums], key: Key, row: Any) -> None:
    target[key] = target.get(key, ZERO) + Sums.of(row)


class SpendSource(Source):
    """The cumulative spend, token and call counters, today's spend and the newest call."""

    queries = (SPEND_TOTALS.name, SPEND_RECENT.name)
    feeds = (c.SPEND, c.TOKENS, c.CALLS, c.LEDGER_LAST_CALL, c.QUEST_SPEND_TODAY)
    exclusions = tuple(("cost_ledger", reason) for reason, _ in COST_ROW_CHECKS)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.totals = SpendTotals()
        self._recent: dict[tuple[Any, Any, Any], Any] = {}
        self._newest: datetime | None = None
        self._recent_read = False

    def statement(self, query: str, refresh: Refresh) -> Statement:
        if query == SPEND_TOTALS.name:
            plan = refresh.plan
            return Statement(SPEND_TOTALS.sql, {"after": plan.after, "safe": plan.safe})
        return Statement(SPEND_RECENT.sql, refresh.instants.params())

    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        statement = self.statement(query, refresh)
        rows = cur.execute(statement.sql, statement.params).fetchall()
        if query == SPEND_TOTALS.name:
            largest = self.totals.apply(refresh.plan, rows)
            refresh.watermark.record(refresh.plan, largest, refresh.clock)
            return
        recent, newest = {}, None
        for r in rows:
            if r.kind == "newest":
                newest = r.last_ts
            else:
                recent[(r.quest, r.layer, r.provider)] = r
        self._recent, self._newest, self._recent_read = recent, newest, True

    @property
    def has_data(self) -> bool:
        return self.totals.read and self._recent_read

    def ready(self, fresh: frozenset[str]) -> bool:
        # Today's spend may lag a failing SPEND_RECENT; the counters are what must be fresh.
        return self.has_data and SPEND_TOTALS.name in fresh

    def series(self) -> list[SpendRow]:
        """Every series of the whole ledger, joined with its window and today's spend."""
        out = []
        for (quest, layer, provider, reason), sums in self.totals.totals.items():
            w = self._recent.get((quest, layer, provider)) if reason is None else None
            out.append(
                SpendRow(
                    quest=quest,
                    layer=layer,
                    provider=provider,
                    reason=reason,
                    sums=sums,
                    cost_window=w.cost_window if w else None,
                    cost_today=w.cost_today if w else None,
                )
            )
        return out

    def weigh(self, labels: LabelGuard) -> None:
        for r in self.series():
            if r.reason is None:
                labels.weigh_quest(r.quest, as_float(r.cost_window))
                labels.weigh_layer(r.layer, as_float(r.cost_window))

    def today(self, labels: LabelGuard) -> Series:
        """Spend since today's midnight per folded quest (quests with spend today)."""
        spend: Series = {}
        for r in self.series():
            if r.reason is None and r.cost_today is not None:
                key = (labels.q(r.quest),)
                spend[key] = spend.get(key, 0.0) + as_float(r.cost_today)
        return spend

    def build(self, build: Build) -> list[Family]:
        # Counters are summed exactly and converted to float once: float sums in a different
        # order (several raw providers fold into one family) can differ in the last bit between
        # refreshes, and a counter that steps back by one ulp is a reset to Prometheus.
        labels, family = build.labels, build.providers.family
        sums: dict[tuple[str, ...], Sums] = defaultdict(lambda: ZERO)
        for r in self.series():
            if r.reason is None:
                key = (*labels.ql(r.quest, r.layer), family(r.provider))
                sums[key] = sums[key] + r.sums
        tokens: Series = {}
        for series, s in sums.items():
            tokens[(*series, "input")] = float(s.input_tokens)
            tokens[(*series, "output")] = float(s.output_tokens)
        families = [
            family_of(c.SPEND, {k: float(s.cost) for k, s in sums.items()}),
            family_of(c.TOKENS, tokens),
            family_of(c.CALLS, {k: float(s.calls) for k, s in sums.items()}),
        ]
        if self._newest is not None and any(r.reason is None for r in self.series()):
            families.append(family_of(c.LEDGER_LAST_CALL, {(): self._newest.timestamp()}))
        today = self.today(labels)
        from exporter.sources.budget import BudgetSource  # budget reads today's spend from here

        budget = build.source(BudgetSource)
        if budget is not None:
            for quest in budget.allocated(labels):
                today.setdefault(quest, 0.0)
        families.append(family_of(c.QUEST_SPEND_TODAY, today))
        return families

    def excluded(self) -> Excluded:
        out: Excluded = dict.fromkeys(self.exclusions, 0.0)
        for (_, _, _, reason), sums in self.totals.totals.items():
            if reason is not None:
                out[("cost_ledger", reason)] += float(sums.calls)
        return out
