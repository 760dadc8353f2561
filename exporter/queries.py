"""Every SQL statement the exporter runs against the ledger, in refresh order.

Each query is set-based and feeds one group of metric families from one scan. Values always
travel as bind parameters; the only composition here is of constant fragments below.
"""

from __future__ import annotations

from dataclasses import dataclass

# Why a cost_ledger row is left out of every sum, tested in this order; a row that passes all
# checks is valid. NaN compares greater than every number in PostgreSQL, hence its own test.
COST_ROW_CHECKS: tuple[tuple[str, str], ...] = (
    ("null_timestamp", "c.ts IS NULL"),
    ("null_cost", "c.cost_usd IS NULL"),
    ("nan_cost", "c.cost_usd = 'NaN'"),
    ("negative_cost", "c.cost_usd < 0"),
    ("infinite_cost", "c.cost_usd = 'Infinity'"),
    (
        "invalid_tokens",
        "c.input_tokens IS NULL OR c.output_tokens IS NULL"
        " OR c.input_tokens < 0 OR c.output_tokens < 0",
    ),
)
# A cost_ledger row's (alias c) exclusion reason, NULL when it is valid.
EXCLUSION_REASON = (
    "CASE " + " ".join(f"WHEN {test} THEN '{reason}'" for reason, test in COST_ROW_CHECKS) + " END"
)

# The same test as "no exclusion reason", written as a plain conjunction so the planner can
# estimate it from column statistics (it cannot see through the CASE, guessed 0.2 % of rows
# valid, and chose joins that scan the whole ledger). NULLs fail every comparison, NaN fails
# "< 'Infinity'".
VALID = """(c.ts IS NOT NULL AND c.cost_usd >= 0 AND c.cost_usd < 'Infinity'
             AND c.input_tokens >= 0 AND c.output_tokens >= 0)"""

# Tokens are summed as numeric: two counts near the bigint limit must not overflow.
_TOKENS = "(c.input_tokens::numeric + c.output_tokens)"

# Costs are summed as numeric, also from a view whose column is a float: the sums are exact and
# independent of row order (a counter must never step back by an ulp), and the exporter adds
# them as Decimal. For a numeric column the cast is no operation at all.
_COST = "c.cost_usd::numeric"


@dataclass(frozen=True)
class Query:
    """A named statement; the name is the ``query`` label of the health metrics."""

    name: str
    sql: str


# The snapshot of the refresh's transaction: every transaction with an xid below ``xmin`` has
# finished; ``xmax`` is the first xid not yet assigned when the snapshot was taken.
SNAPSHOT = Query(
    "snapshot",
    """
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::numeric AS xmin,
           pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS xmax
    """,
)

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
               sum({_COST}) AS cost,
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
           sum({_COST}) AS cost_window,
           sum({_COST}) FILTER (WHERE c.ts >= %(today_start)s) AS cost_today,
           NULL::timestamptz AS last_ts
    FROM cost_ledger c
    WHERE c.ts >= %(window_start)s AND {VALID}
    GROUP BY c.quest, c.layer, c.provider
    UNION ALL
    SELECT 'newest', NULL, NULL, NULL, NULL, NULL,
           (SELECT c.ts FROM cost_ledger c WHERE {VALID} ORDER BY c.ts DESC LIMIT 1)
    """,
)

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

# The window families (rankings, waste, per-quest impact, providers) are computed in Python
# from per-task lifetime sums that the exporter keeps, like the cumulative sums, as a final
# part (ids <= the watermark) plus a tail re-read each refresh (exporter/window.py). Both
# statements return rows of three kinds:
#   'sum'    (part, task_id, provider, cost, tokens): valid spend of a task on one raw provider;
#   'label'  (part, task_id, quest, layer, last_ts): the task's latest valid row, by (ts, id);
#   'impact' (task_id, impact): the latest measured impact of a task that may be in the window.
# part 0 is final (ids the exporter already holds, or up to %(safe)s when rebuilding), 1 the
# tail rows that became final (ids up to %(safe)s), 2 the open tail; a later part holds larger
# ids, so it wins a tie on ts.


def _impacts(tasks: str) -> str:
    return f"""
    SELECT 'impact', NULL, k.task_id, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT CASE WHEN i.impact_score IN ('NaN', 'Infinity', '-Infinity') THEN NULL
                        ELSE i.impact_score END
            FROM impact_ledger i
            WHERE i.task_id = k.task_id
            ORDER BY i.measured_at DESC NULLS LAST
            LIMIT 1)
    FROM ({tasks}) k
    """


# Rebuild from the window: the tasks with a valid row since %(window_start)s (one scan of the ts
# index, hashed per task and raw provider), with what each spent before the window from a probe
# of the (task_id, ts) index that finds nothing for most tasks. Joining the window's tasks to
# their whole history made the planner hash-join (scan) the whole ledger once the history
# outgrew the window. The latest valid row is looked up only when a task's rows disagree on the
# labels (hashing beats sorting the window by task and time to find it).
WINDOW_TASKS = Query(
    "window_tasks",
    f"""
    WITH win AS (
        SELECT c.id <= %(safe)s AS final, c.task_id, c.provider,
               min(c.quest COLLATE "C") AS quest, max(c.quest COLLATE "C") AS quest_max,
               min(c.layer COLLATE "C") AS layer, max(c.layer COLLATE "C") AS layer_max,
               bool_and(c.quest IS NOT NULL AND c.layer IS NOT NULL) AS labelled,
               sum({_COST}) AS cost,
               sum({_TOKENS}) AS tokens,
               max(c.ts) AS last_ts
        FROM cost_ledger c
        WHERE c.ts >= %(window_start)s AND c.task_id IS NOT NULL AND {VALID}
        GROUP BY 1, 2, 3
    ),
    win_tasks AS (
        SELECT final, task_id, min(quest) AS quest, max(quest_max) AS quest_max,
               min(layer) AS layer, max(layer_max) AS layer_max, bool_and(labelled) AS labelled,
               max(last_ts) AS last_ts
        FROM win
        GROUP BY final, task_id
    ),
    tracked AS (SELECT DISTINCT task_id FROM win_tasks)
    SELECT 'sum' AS kind, CASE WHEN final THEN 0 ELSE 2 END AS part, task_id, provider,
           NULL AS quest, NULL AS layer, cost, tokens, NULL::timestamptz AS last_ts,
           NULL::float8 AS impact
    FROM win
    UNION ALL
    SELECT 'sum', CASE WHEN b.final THEN 0 ELSE 2 END, t.task_id, b.provider, NULL, NULL,
           b.cost, b.tokens, NULL, NULL
    FROM tracked t
    CROSS JOIN LATERAL (
        SELECT c.id <= %(safe)s AS final, c.provider,
               sum({_COST}) AS cost, sum({_TOKENS}) AS tokens
        FROM cost_ledger c
        WHERE c.task_id = t.task_id AND c.ts < %(window_start)s AND {VALID}
        GROUP BY 1, 2
    ) b
    UNION ALL
    SELECT 'label', CASE WHEN w.final THEN 0 ELSE 2 END, w.task_id, NULL,
           CASE WHEN latest.found THEN latest.quest ELSE w.quest END,
           CASE WHEN latest.found THEN latest.layer ELSE w.layer END,
           NULL, NULL, w.last_ts, NULL
    FROM win_tasks w
    LEFT JOIN LATERAL (
        SELECT true AS found, c.quest, c.layer
        FROM cost_ledger c
        WHERE NOT (w.labelled AND w.quest = w.quest_max AND w.layer = w.layer_max)
          AND c.task_id = w.task_id AND c.ts = w.last_ts AND (c.id <= %(safe)s) = w.final
          AND {VALID}
        ORDER BY c.id DESC
        LIMIT 1
    ) latest ON true
    UNION ALL
    {_impacts("SELECT task_id FROM tracked")}
    """,
)
"""Rebuilds the per-task sums of the window's tasks (first refresh and reconciliation)."""

# Add the rows after %(after)s (a primary-key range scan) to the tasks the exporter holds
# (%(tracked)s, a JSON array: tens of thousands of ids dump and parse faster than a text[]).
# For a tail task it does not hold (a new task, or an old one back in the window), read
# everything up to %(after)s once.
WINDOW_TASKS_STEADY = Query(
    "window_tasks",
    f"""
    WITH tracked AS (SELECT json_array_elements_text(%(tracked)s::json) AS task_id),
    tail AS MATERIALIZED (
        SELECT CASE WHEN c.id <= %(safe)s THEN 1 ELSE 2 END AS part, c.id, c.task_id,
               c.provider, c.quest, c.layer, c.ts, {_COST} AS cost_usd, {_TOKENS} AS tokens
        FROM cost_ledger c
        WHERE c.id > %(after)s AND c.task_id IS NOT NULL AND {VALID}
    ),
    fresh AS (
        SELECT DISTINCT t.task_id FROM tail t
        WHERE NOT EXISTS (SELECT FROM tracked k WHERE k.task_id = t.task_id)
    )
    SELECT 'sum' AS kind, 0 AS part, f.task_id, h.provider, NULL AS quest, NULL AS layer,
           h.cost, h.tokens, NULL::timestamptz AS last_ts, NULL::float8 AS impact
    FROM fresh f
    CROSS JOIN LATERAL (
        SELECT c.provider, sum({_COST}) AS cost, sum({_TOKENS}) AS tokens
        FROM cost_ledger c
        WHERE c.task_id = f.task_id AND c.id <= %(after)s AND {VALID}
        GROUP BY c.provider
    ) h
    UNION ALL
    SELECT 'label', 0, f.task_id, NULL, h.quest, h.layer, NULL, NULL, h.ts, NULL
    FROM fresh f
    CROSS JOIN LATERAL (
        SELECT c.quest, c.layer, c.ts
        FROM cost_ledger c
        WHERE c.task_id = f.task_id AND c.id <= %(after)s AND {VALID}
        ORDER BY c.ts DESC, c.id DESC
        LIMIT 1
    ) h
    UNION ALL
    SELECT 'sum', part, task_id, provider, NULL, NULL, sum(cost_usd), sum(tokens), NULL, NULL
    FROM tail
    GROUP BY part, task_id, provider
    UNION ALL
    (SELECT DISTINCT ON (part, task_id)
            'label', part, task_id, NULL, quest, layer, NULL, NULL, ts, NULL
     FROM tail
     ORDER BY part, task_id, ts DESC, id DESC)
    UNION ALL
    {_impacts("SELECT task_id FROM tracked UNION SELECT task_id FROM tail")}
    """,
)
"""Adds the rows after the watermark to the per-task sums the exporter holds."""

ALL_QUERIES: tuple[Query, ...] = (
    SPEND_TOTALS,
    SPEND_RECENT,
    BUDGET_TODAY,
    WINDOW_TASKS,
)
"""The queries of one refresh, in order."""

# --- Backfill (a one-off history export, not part of a refresh) ------------------------------

# Valid rows per hour from %(start)s to %(end)s, and one row per series of everything before.
HOURLY_SPEND = Query(
    "hourly_spend",
    f"""
    SELECT CASE WHEN c.ts < %(start)s THEN NULL
                ELSE date_bin('1 hour', c.ts, %(start)s) END AS hour,
           c.quest, c.layer, c.provider,
           count(*) AS calls,
           sum({_COST}) AS cost,
           sum(c.input_tokens) AS input_tokens,
           sum(c.output_tokens) AS output_tokens
    FROM cost_ledger c
    WHERE c.ts < %(end)s AND {VALID}
    GROUP BY 1, 2, 3, 4
    ORDER BY 1 NULLS FIRST
    """,
)

BUDGET_DAYS = Query(
    "budget_days",
    """
    SELECT b.quest, b.day, sum(b.allocated_usd) AS allocated
    FROM quest_budget_allocations b
    WHERE b.day BETWEEN %(first_day)s AND %(last_day)s
      AND b.allocated_usd >= 0 AND b.allocated_usd < 'Infinity'
    GROUP BY b.quest, b.day
    """,
)

EXCLUSION_REASONS: tuple[tuple[str, str], ...] = (
    *(("cost_ledger", reason) for reason, _ in COST_ROW_CHECKS),
    ("quest_budget_allocations", "invalid_allocation"),
)
"""Every (relation, reason) the excluded-rows family reports, zeros included."""

QUERY_OF_RELATION = {"cost_ledger": SPEND_TOTALS, "quest_budget_allocations": BUDGET_TODAY}
"""The query that counts each relation's excluded rows."""
