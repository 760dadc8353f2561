"""The window families: rankings, waste, per-quest impact and the provider breakdown.

They rank, sum and classify the tasks with a valid row in the window by what each spent over
its whole life, from per-task sums the exporter keeps (exporter/tasks.py): a rebuild reads the
window's tasks, a steady refresh the rows after the watermark and the impacts.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from functools import cache
from typing import Any

import psycopg
from prometheus_client.metrics_core import Metric as Family

from exporter import catalog as c
from exporter.families import LabelGuard, Series, as_float
from exporter.queries import OPTIONAL_TOKENS, Columns, Output, Periods, Query
from exporter.sources.base import Build, Refresh, Source, Statement, streamed
from exporter.summary import AMOUNT_DIGITS, WindowRow, rounded
from exporter.tasks import Now, WindowTasks, pricer

# The window families (rankings, waste, per-quest impact, providers) are computed in Python
# from per-task lifetime sums that the exporter keeps, like the cumulative sums, as a final
# part (ids <= the watermark) plus a tail re-read each refresh (exporter/tasks.py). Both
# statements return rows of three kinds:
#   'sum'    (part, task_id, provider, model, period, sums): valid spend of a task on one raw
#            provider and model in one price period (the list price is applied to its sums;
#            they cross as _crossing says);
#   'label'  (part, task_id, quest, layer, last_us): the task's latest valid row, by (ts, id)
#            (last_us: its ts as _us says);
#            a rebuild's also carries the task's latest impact (NULL: none measured);
#   'impact' (task_id, impact): the latest measured impact of a task that may be in the window
#            (a steady refresh's, for the tasks whose impact may have changed).
# part 0 is final (ids the exporter already holds, or up to %(safe)s when rebuilding), 1 the
# tail rows that became final (ids up to %(safe)s), 2 the open tail; a later part holds larger
# ids, so it wins a tie on ts.
# A task keeps its cost and the token sums its list price reads (prices.Price.value): not
# calls or reasoning tokens, which would only widen the window's groups.
_KEPT = ("cost", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_INT8_END = 2**63  # compared in the sum's own type: a float sum below it fits int8 too


def _fitted(source: str, alias: str) -> str:
    """``source`` (a relation with the ``_KEPT`` columns) as ``alias``, with ``fits``: whether
    its sums cross as int8 (``_crossing``).

    Sums of valid rows are never negative, so only the upper bound is tested. A whole number
    of units: the cost has at most 12 decimals (its scale: trailing zeros past it only cost the
    fast path), and each count none. Tested once per row: OFFSET 0 keeps the planner from
    copying the test into each of ``_crossing``'s ten columns, which cost a rebuild's query
    half again its database time at 1 M rows.
    """
    a = alias
    fits = [f"scale({a}.cost) <= {AMOUNT_DIGITS}", f"{a}.cost * 1e{AMOUNT_DIGITS} < {_INT8_END}"]
    fits += [f"floor({v}) = {v} AND {v} < {_INT8_END}" for v in _counts(a)]
    return f"(SELECT {a}.*, {' AND '.join(fits)} AS fits FROM {source} {a} OFFSET 0) {a}"


def _counts(alias: str) -> list[str]:
    return [f"coalesce({alias}.{name}, 0)" for name in _KEPT[1:]]


def _crossing(alias: str) -> dict[str, str]:
    """The sums of a row of ``_fitted(..., alias)`` as they cross to the exporter.

    When they fit, as int8 (the ``*_i8`` columns: the cost in summary's units, an optional
    count's NULL as 0), with the numeric columns NULL: psycopg reads an int8 several times
    faster than a numeric, and a rebuild reads about a row a task. Otherwise (finer digits,
    past int64, a fractional count in a view) the int8 columns are NULL and the sums cross as
    they are.
    """
    whole = [f"{alias}.cost * 1e{AMOUNT_DIGITS}", *_counts(alias)]
    return {
        **{
            f"{n}_i8": f"CASE WHEN {alias}.fits THEN ({v})::int8 END"
            for v, n in zip(whole, _KEPT, strict=True)
        },
        **{n: f"CASE WHEN NOT {alias}.fits THEN {alias}.{n} END" for n in _KEPT},
    }


def _us(ts: str) -> str:
    """A timestamptz as int8 microseconds since the Unix epoch, as the task store keeps times
    (exporter/store.py): psycopg reads an int8 several times faster than a timestamptz. Exact:
    extract returns a numeric (PostgreSQL 14 and later; 13's float8 is within a quarter of a
    microsecond until 2112, and the cast rounds to the nearest)."""
    return f"(extract(epoch FROM {ts}) * 1000000)::int8"


# The columns every window statement returns (the kinds above).
_OUTPUT = Output(
    {
        "kind": "NULL::text",
        "part": "NULL::integer",
        "task_id": "NULL",
        "provider": "NULL",
        "model": "NULL",
        "period": "NULL::timestamptz",
        "quest": "NULL",
        "layer": "NULL",
        "last_us": "NULL::int8",
        "impact": "NULL::float8",
        **{f"{n}_i8": "NULL::int8" for n in _KEPT},
        **dict.fromkeys(_KEPT, "NULL::numeric"),
    }
)


def _sums(alias: str, task_id: str) -> dict[str, str]:
    """The columns of a 'sum' row from ``alias``, a ``_fitted`` group of task ``task_id``."""
    series = {name: f"{alias}.{name}" for name in ("provider", "model", "period")}
    return {"task_id": task_id, **series, **_crossing(alias)}


def _latest(part: str, task_id: str, row: str) -> str:
    """The columns of a 'label' row from ``row``, the latest valid row of a task's part."""
    return _OUTPUT.select(
        kind="'label'",
        part=part,
        task_id=task_id,
        quest=f"{row}.quest",
        layer=f"{row}.layer",
        last_us=_us(f"{row}.ts"),
    )


def _part(alias: str) -> str:
    """A rebuild's part of a group whose ``final`` says whether its ids are up to %(safe)s."""
    return f"CASE WHEN {alias}.final THEN 0 ELSE 2 END"


# A numeric impact past float8's range does not convert to the statement's float8 (an error,
# every refresh): past the largest float it is as an infinity, not measured; at or below half
# the smallest (subnormal) float it is the float nearest to it, 0. That bound is compared as
# numeric: as a float8 it is the smallest float itself (5e-324), which would be taken for 0.
_FLOAT8_MAX = "1.7976931348623157e308"
_FLOAT8_HALF_TINY = "2.4703282292062328e-324"


def _latest_impact(task_id: str) -> str:
    """The latest measured impact of task ``task_id`` (an SQL expression), NULL for none (or
    NaN, or an infinity)."""
    return f"""
           (SELECT CASE WHEN i.impact_score IN ('NaN', 'Infinity', '-Infinity')
                          OR abs(i.impact_score) > {_FLOAT8_MAX} THEN NULL
                        WHEN abs(i.impact_score)::numeric <= {_FLOAT8_HALF_TINY} THEN 0
                        ELSE i.impact_score END
            FROM impact_ledger i
            WHERE i.task_id = {task_id}
            ORDER BY i.measured_at DESC NULLS LAST
            LIMIT 1)"""


def _impacts(tasks: str) -> str:
    impact = _latest_impact("k.task_id")
    return f"""
    SELECT {_OUTPUT.select(kind="'impact'", task_id="k.task_id", impact=impact)}
    FROM ({tasks}) k
    """


# The database's clock (the transaction's start): impacts measured after it, less the lag, are
# read by the next steady refresh.
_CLOCK = f"""
    SELECT {_OUTPUT.select(kind="'clock'", last_us=_us("now()"))}
    """


# Rebuild from the window: the tasks with a valid row since %(window_start)s (one scan of the ts
# index, hashed per task, raw provider and model: the schema's ndistinct statistics on those
# columns let the planner see about one group per task), with what each spent before the window.
# Which tasks did is a semi-join the planner chooses a plan for: probes of the (task_id, ts)
# index when the history before the window is long, a scan of it when short (a probe that
# aggregates per task cost 30 s for 430,000 window tasks; the semi-join, 65 ms); only those
# tasks' earlier rows are then summed. It starts from the window's (task, provider, model)
# groups, whose estimate is about one a task: the planner guesses 200 rows for a DISTINCT over
# a CTE, and for 200 tasks it always probed (5 s at 10 M rows in the window, against 0.1 s).
# Joining the window's tasks to their whole history made the planner hash-join (scan) the
# whole ledger once the history outgrew the window. The latest valid row is looked up only when
# a task's rows disagree on the labels (hashing beats sorting the window by task and time to
# find it).
@cache
def window_tasks(cols: Columns, periods: Periods) -> Query:
    """Rebuilds the per-task sums of the window's tasks (first refresh and reconciliation)."""
    earlier_sums = _fitted(
        f"""(
            SELECT c.id <= %(safe)s AS final, c.provider, c.model, {periods.column} AS period,
                   {cols.sums(_KEPT)}
            FROM cost_ledger c
            WHERE c.task_id = t.task_id AND c.ts < %(window_start)s AND {cols.valid}
            GROUP BY {periods.group_by(1, 2, 3)}
        )""",
        "b",
    )
    label = _OUTPUT.select(
        kind="'label'",
        part=_part("w"),
        task_id="w.task_id",
        quest="CASE WHEN latest.found THEN latest.quest ELSE w.quest END",
        layer="CASE WHEN latest.found THEN latest.layer ELSE w.layer END",
        last_us=_us("w.last_ts"),
        impact=_latest_impact("w.task_id"),
    )
    return Query(
        "window_tasks",
        f"""
        WITH win AS (
            SELECT c.id <= %(safe)s AS final, c.task_id, c.provider, c.model,
                   {periods.column} AS period,
                   min(c.quest COLLATE "C") AS quest, max(c.quest COLLATE "C") AS quest_max,
                   min(c.layer COLLATE "C") AS layer, max(c.layer COLLATE "C") AS layer_max,
                   bool_and(c.quest IS NOT NULL AND c.layer IS NOT NULL) AS labelled,
                   {cols.sums(_KEPT)},
                   max(c.ts) AS last_ts
            FROM cost_ledger c
            WHERE c.ts >= %(window_start)s AND c.task_id IS NOT NULL AND {cols.valid}
            GROUP BY {periods.group_by(1, 2, 3, 4)}
        ),
        win_tasks AS (
            SELECT final, task_id, min(quest) AS quest, max(quest_max) AS quest_max,
                   min(layer) AS layer, max(layer_max) AS layer_max, bool_and(labelled) AS labelled,
                   max(last_ts) AS last_ts
            FROM win
            GROUP BY final, task_id
        ),
        earlier AS (
            SELECT DISTINCT t.task_id FROM win t
            WHERE EXISTS (SELECT FROM cost_ledger c
                          WHERE c.task_id = t.task_id AND c.ts < %(window_start)s
                            AND {cols.valid})
        )
        SELECT {_OUTPUT.select(kind="'sum'", part=_part("w"), **_sums("w", "w.task_id"))}
        FROM {_fitted("win", "w")}
        UNION ALL
        SELECT {_OUTPUT.select(kind="'sum'", part=_part("b"), **_sums("b", "t.task_id"))}
        FROM earlier t
        CROSS JOIN LATERAL {earlier_sums}
        UNION ALL
        SELECT {label}
        FROM win_tasks w
        LEFT JOIN LATERAL (
            SELECT true AS found, c.quest, c.layer
            FROM cost_ledger c
            WHERE NOT (w.labelled AND w.quest = w.quest_max AND w.layer = w.layer_max)
              AND c.task_id = w.task_id AND c.ts = w.last_ts AND (c.id <= %(safe)s) = w.final
              AND {cols.valid}
            ORDER BY c.id DESC
            LIMIT 1
        ) latest ON true
        UNION ALL
        {_CLOCK}
        """,
    )


WINDOW_TASKS = window_tasks(Columns(), Periods(0))


# A steady refresh reads the rows after %(after)s (a primary-key range scan), grouped per task
# as a rebuild groups the window; the labels come from each part's latest row.
@cache
def window_tail(cols: Columns, periods: Periods) -> Query:
    """The rows after the watermark, summed per task, provider, model and price period."""
    optional = "".join(f", {cols.ref(col)} AS {col}" for col in OPTIONAL_TOKENS)
    tail_sums = _fitted(
        f"""(
            SELECT c.part, c.task_id, c.provider, c.model, {periods.column} AS period,
                   {cols.sums(_KEPT)}
            FROM tail c
            GROUP BY {periods.group_by(1, 2, 3, 4)}
        )""",
        "s",
    )
    return Query(
        "window_tasks",
        f"""
        WITH tail AS MATERIALIZED (
            SELECT CASE WHEN c.id <= %(safe)s THEN 1 ELSE 2 END AS part, c.id, c.task_id,
                   c.provider, c.model, c.quest, c.layer, c.ts, c.cost_usd, c.input_tokens,
                   c.output_tokens{optional}
            FROM cost_ledger c
            WHERE c.id > %(after)s AND c.task_id IS NOT NULL AND {cols.valid}
        )
        SELECT {_OUTPUT.select(kind="'sum'", part="s.part", **_sums("s", "s.task_id"))}
        FROM {tail_sums}
        UNION ALL
        (SELECT DISTINCT ON (t.part, t.task_id) {_latest("t.part", "t.task_id", "t")}
         FROM tail t
         ORDER BY t.part, t.task_id, t.ts DESC, t.id DESC)
        """,
    )


# Then, for the tail's tasks the exporter does not hold (%(entering)s, a JSON array: new tasks,
# or old ones back in the window), every valid row up to %(after)s, once (the (task_id, ts)
# index); the latest impact of those tasks and of every task with an impact measured after
# %(impacts_since)s (the measured_at index); and the database's clock, which sets the next
# refresh's %(impacts_since)s.
_CHANGED = """
    SELECT task_id FROM entering
    UNION
    SELECT i.task_id FROM impact_ledger i WHERE i.measured_at > %(impacts_since)s
"""


@cache
def window_history(cols: Columns, periods: Periods) -> Query:
    """The entering tasks' earlier rows, and the impacts that changed."""
    history_sums = _fitted(
        f"""(
            SELECT c.provider, c.model, {periods.column} AS period, {cols.sums(_KEPT)}
            FROM cost_ledger c
            WHERE c.task_id = f.task_id AND c.id <= %(after)s AND {cols.valid}
            GROUP BY {periods.group_by(1, 2)}
        )""",
        "h",
    )
    return Query(
        "window_tasks",
        f"""
        WITH entering AS (SELECT json_array_elements_text(%(entering)s::json) AS task_id)
        SELECT {_OUTPUT.select(kind="'sum'", part="0", **_sums("h", "f.task_id"))}
        FROM entering f
        CROSS JOIN LATERAL {history_sums}
        UNION ALL
        SELECT {_latest("0", "f.task_id", "h")}
        FROM entering f
        CROSS JOIN LATERAL (
            SELECT c.quest, c.layer, c.ts
            FROM cost_ledger c
            WHERE c.task_id = f.task_id AND c.id <= %(after)s AND {cols.valid}
            ORDER BY c.ts DESC, c.id DESC
            LIMIT 1
        ) h
        UNION ALL
        {_impacts(_CHANGED)}
        UNION ALL
        {_CLOCK}
        """,
    )


class WindowSource(Source):
    """Per-task lifetime sums of the window's tasks, and the families ranked from them."""

    queries = (WINDOW_TASKS.name,)
    feeds = (
        c.PROVIDER_SPEND,
        c.PROVIDER_TASKS,
        c.PROVIDER_TOKENS,
        c.PROVIDER_AVG_COST,
        c.TASK_IMPACT_PER_USD,
        c.TASK_COST,
        c.TASK_IMPACT,
        c.QUEST_IMPACT_PER_USD,
        c.QUEST_WINDOW_SPEND,
        c.QUEST_WINDOW_IMPACT,
        c.TASK_WASTED_TOKENS,
        c.TASK_WASTED_USD,
        c.WASTED_TOKENS,
        c.WASTED_USD,
        c.WASTED_TASKS,
        c.PROVIDER_LIST_PRICE,
        c.TASK_IMPACT_PER_LIST_USD,
        c.TASK_LIST_PRICE,
        c.WASTED_LIST_PRICE,
    )

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tasks = WindowTasks(self.settings)
        self._rows: list[WindowRow] | None = None

    def statement(self, query: str, refresh: Refresh) -> Statement:
        """The rebuild, or a steady refresh's first statement (the tail)."""
        full, safe = self.tasks.bounds(refresh.plan)
        params = refresh.instants.params() | {"after": self.tasks.frozen_id, "safe": safe}
        params |= self.prices.params()
        build = window_tasks if full else window_tail
        return Statement(build(refresh.columns, self.prices.periods).sql, params)

    def rebuilds(self, query: str, refresh: Refresh) -> bool:
        return self.tasks.bounds(refresh.plan)[0]

    def history(self, columns: Columns, entering: str) -> Statement:
        """A steady refresh's second statement: the entering tasks' earlier rows (``entering``,
        a JSON array of task ids) and the impacts that changed."""
        sql = window_history(columns, self.prices.periods).sql
        params: dict[str, Any] = {"after": self.tasks.frozen_id, "entering": entering}
        params |= {"impacts_since": self.tasks.impacts_since} | self.prices.params()
        return Statement(sql, params)

    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        # A rebuild returns rows for every task of the window: they are folded into the
        # per-task sums as they arrive instead of being held all at once.
        statement = self.statement(query, refresh)
        instants = refresh.instants
        priced = pricer(self.providers, self.prices)
        now = Now.at(instants.window_start, instants.grace_cutoff, priced)
        if self.tasks.bounds(refresh.plan)[0]:
            # In binary: its int8 and float8 columns load faster than parsed from text.
            with streamed(cur, statement, binary=True) as rows:
                self.tasks.rebuild(refresh.plan, rows, now)
        else:
            tail = cur.execute(statement.sql, statement.params).fetchall()
            history = self.history(refresh.columns, self.tasks.entering(tail))
            found = cur.execute(history.sql, history.params).fetchall()
            self.tasks.advance(refresh.plan, tail, found, now)
        self._rows = self.tasks.rows()

    @property
    def has_data(self) -> bool:
        return self._rows is not None

    def weigh(self, labels: LabelGuard) -> None:
        for r in self._rows or ():
            if r.kind in ("waste_total", "quest"):
                labels.weigh_quest(r.quest)
            if r.kind == "waste_total":
                labels.weigh_layer(r.layer)

    def build(self, build: Build) -> list[Family]:
        rows = self._rows or []
        return _window(rows, build) + _providers(rows, build)


WASTE = ("tokens", "usd", "tasks", "listed")


def _window(rows: list[WindowRow], build: Build) -> list[Family]:
    labels = build.labels
    ranked: dict[str, dict[tuple[str, ...], WindowRow]] = {
        "efficiency": {},
        "efficiency_list": {},
        "waste": {},
    }
    # Several raw values can share one label (quests folded into `other`, text that cleans the
    # same): their sums are exact and converted once, or they would follow the rows' order,
    # which differs between a steady refresh and a rebuild.
    exact: dict[str, dict[tuple[str, ...], Any]] = {
        "tokens": defaultdict(int),
        "usd": defaultdict(Decimal),
        "tasks": defaultdict(int),
        "listed": defaultdict(Decimal),
        "quest_usd": defaultdict(Decimal),
        "quest_impact": defaultdict(int),  # in units of 2**-1074 (summary.exact)
    }
    for r in rows:
        key: tuple[str, ...]
        if r.kind in ranked:
            key = (labels.task(r.task_id), labels.quest(r.quest), labels.layer(r.layer))
            # Keep the better-ranked task when two ids clean to the same label values.
            ranked[r.kind].setdefault(key, r)
        elif r.kind == "waste_total":
            key = labels.ql(r.quest, r.layer)
            exact["tokens"][key] += r.tokens
            exact["usd"][key] += r.cost
            exact["tasks"][key] += r.tasks
            exact["listed"][key] += r.listed
        elif r.kind == "quest":
            key = (labels.q(r.quest),)
            exact["quest_usd"][key] += r.cost
            exact["quest_impact"][key] += r.impact_exact
    waste = {name: {k: as_float(v) for k, v in exact[name].items()} for name in WASTE}
    quest_cost = {k: as_float(v) for k, v in exact["quest_usd"].items()}
    quest_impact = {k: rounded(v) for k, v in exact["quest_impact"].items()}
    eff, wasted, eff_list = ranked["efficiency"], ranked["waste"], ranked["efficiency_list"]
    return [
        build.family(
            c.TASK_IMPACT_PER_LIST_USD,
            {k: as_float(r.impact) / as_float(r.listed) for k, r in eff_list.items()},
        ),
        build.family(c.TASK_LIST_PRICE, {k: as_float(r.listed) for k, r in eff_list.items()}),
        build.family(c.WASTED_LIST_PRICE, waste["listed"]),
        build.family(
            c.TASK_IMPACT_PER_USD,
            {k: as_float(r.impact) / as_float(r.cost) for k, r in eff.items()},
        ),
        build.family(c.TASK_COST, {k: as_float(r.cost) for k, r in eff.items()}),
        build.family(c.TASK_IMPACT, {k: as_float(r.impact) for k, r in eff.items()}),
        build.family(c.TASK_WASTED_TOKENS, {k: as_float(r.tokens) for k, r in wasted.items()}),
        build.family(c.TASK_WASTED_USD, {k: as_float(r.cost) for k, r in wasted.items()}),
        build.family(c.WASTED_TOKENS, waste["tokens"]),
        build.family(c.WASTED_USD, waste["usd"]),
        build.family(c.WASTED_TASKS, waste["tasks"]),
        build.family(c.QUEST_WINDOW_SPEND, quest_cost),
        build.family(c.QUEST_WINDOW_IMPACT, quest_impact),
        build.family(
            c.QUEST_IMPACT_PER_USD,
            {k: quest_impact[k] / cost for k, cost in quest_cost.items() if cost > 0},
        ),
    ]


def _providers(rows: list[WindowRow], build: Build) -> list[Family]:
    found = {r.family: r for r in rows if r.kind == "provider"}
    spend: Series = {}
    tasks: Series = {}
    tokens: Series = {}
    avg: Series = {}
    listed: Series = {}
    for name in build.providers.families:
        r = found.get(name)
        key = (name,)
        spend[key] = as_float(r.cost) if r else 0.0
        listed[key] = as_float(r.listed) if r else 0.0
        tasks[key] = float(r.tasks) if r else 0.0
        tokens[key] = as_float(r.tokens) if r else 0.0
        if tasks[key] > 0:
            avg[key] = spend[key] / tasks[key]
    return [
        build.family(c.PROVIDER_SPEND, spend),
        build.family(c.PROVIDER_TASKS, tasks),
        build.family(c.PROVIDER_TOKENS, tokens),
        build.family(c.PROVIDER_AVG_COST, avg),
        build.family(c.PROVIDER_LIST_PRICE, listed),
    ]
