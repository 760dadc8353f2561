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
_EXCLUSION_REASON = (
    "CASE " + " ".join(f"WHEN {test} THEN '{reason}'" for reason, test in COST_ROW_CHECKS) + " END"
)

# The same test as "no exclusion reason", written as a plain conjunction so the planner can
# estimate it from column statistics (it cannot see through the CASE, guessed 0.2 % of rows
# valid, and chose joins that scan the whole ledger). NULLs fail every comparison, NaN fails
# "< 'Infinity'".
_VALID = """(c.ts IS NOT NULL AND c.cost_usd >= 0 AND c.cost_usd < 'Infinity'
             AND c.input_tokens >= 0 AND c.output_tokens >= 0)"""

# Tokens are summed as numeric: two counts near the bigint limit must not overflow.
_TOKENS = "(c.input_tokens::numeric + c.output_tokens)"


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
# tail (added to them for this refresh only). after = -1 recomputes the whole ledger.
#
# One hash aggregate over (final, quest, layer, provider, valid): grouping by columns and
# booleans lets the planner estimate a few thousand groups. Grouping every row by the exclusion
# reason made it guess one group per row and sort the whole ledger, so the reasons come from a
# second, filtered scan that runs only when the first one saw excluded rows (an init plan the
# executor checks before starting that scan).
SPEND_TOTALS = Query(
    "spend_totals",
    f"""
    WITH g AS MATERIALIZED (
        SELECT c.id <= %(safe)s AS final, c.quest, c.layer, c.provider, {_VALID} IS TRUE AS valid,
               count(*) AS calls,
               sum(c.cost_usd) AS cost,
               sum(c.input_tokens) AS input_tokens,
               sum(c.output_tokens) AS output_tokens,
               max(c.id) AS max_id
        FROM cost_ledger c
        WHERE c.id > %(after)s
        GROUP BY 1, 2, 3, 4, 5
    )
    SELECT final, quest, layer, provider, NULL AS reason,
           calls, cost, input_tokens, output_tokens, max_id
    FROM g
    WHERE valid
    UNION ALL
    SELECT c.id <= %(safe)s, c.quest, c.layer, c.provider, {_EXCLUSION_REASON},
           count(*), NULL, NULL, NULL, max(c.id)
    FROM cost_ledger c
    WHERE EXISTS (SELECT FROM g WHERE NOT g.valid)
      AND c.id > %(after)s AND {_VALID} IS NOT TRUE
    GROUP BY 1, 2, 3, 4, 5
    """,
)

# What depends on time, not on the history: the window's spend (the label guard's weights) and
# today's, from the ts index; and the newest valid call, from the end of that index.
SPEND_RECENT = Query(
    "spend_recent",
    f"""
    SELECT 'series' AS kind, c.quest, c.layer, c.provider,
           sum(c.cost_usd) AS cost_window,
           sum(c.cost_usd) FILTER (WHERE c.ts >= %(today_start)s) AS cost_today,
           NULL::timestamptz AS last_ts
    FROM cost_ledger c
    WHERE c.ts >= %(window_start)s AND {_VALID}
    GROUP BY c.quest, c.layer, c.provider
    UNION ALL
    SELECT 'newest', NULL, NULL, NULL, NULL, NULL,
           (SELECT c.ts FROM cost_ledger c WHERE {_VALID} ORDER BY c.ts DESC LIMIT 1)
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

# Rankings, waste, per-quest impact and the provider families share one scan of the window
# (the tasks with a valid row since %(window_start)s), aggregated per task and raw provider.
# What each of those tasks spent before the window comes from a probe of the (task_id, ts)
# index that finds nothing for most tasks, so the cost follows the window, not the history:
# joining the window's tasks to their whole history made the planner hash-join (scan) the
# whole ledger once the history outgrew the window. Ties break on task_id in byte order
# (COLLATE "C") so the ranking does not depend on the server's locale. Provider families come
# from Python regex rules; the raw -> family map travels as two arrays.
WINDOW_TASKS = Query(
    "window_tasks",
    f"""
    WITH win AS (
        SELECT c.task_id, c.provider,
               min(c.quest COLLATE "C") AS quest, max(c.quest COLLATE "C") AS quest_max,
               min(c.layer COLLATE "C") AS layer, max(c.layer COLLATE "C") AS layer_max,
               bool_and(c.quest IS NOT NULL AND c.layer IS NOT NULL) AS labelled,
               sum(c.cost_usd) AS cost,
               sum({_TOKENS}) AS tokens,
               max(c.ts) AS last_ts
        FROM cost_ledger c
        WHERE c.ts >= %(window_start)s AND c.task_id IS NOT NULL AND {_VALID}
        GROUP BY c.task_id, c.provider
    ),
    win_tasks AS (
        SELECT task_id, min(quest) AS quest, max(quest_max) AS quest_max,
               min(layer) AS layer, max(layer_max) AS layer_max, bool_and(labelled) AS labelled,
               sum(cost) AS cost, sum(tokens) AS tokens, max(last_ts) AS last_ts
        FROM win
        GROUP BY task_id
    ),
    before AS (
        SELECT b.*
        FROM win_tasks w
        CROSS JOIN LATERAL (
            SELECT c.task_id, c.provider, sum(c.cost_usd) AS cost, sum({_TOKENS}) AS tokens
            FROM cost_ledger c
            WHERE c.task_id = w.task_id AND c.ts < %(window_start)s AND {_VALID}
            GROUP BY c.task_id, c.provider
        ) b
    ),
    tasks AS (
        SELECT w.task_id,
               CASE WHEN latest.found THEN latest.quest ELSE w.quest END COLLATE "default" AS quest,
               CASE WHEN latest.found THEN latest.layer ELSE w.layer END COLLATE "default" AS layer,
               w.cost + coalesce(b.cost, 0) AS cost,
               w.tokens + coalesce(b.tokens, 0) AS tokens,
               w.last_ts
        FROM win_tasks w
        LEFT JOIN (SELECT task_id, sum(cost) AS cost, sum(tokens) AS tokens
                   FROM before GROUP BY task_id) b USING (task_id)
        -- A task is labelled by its latest valid row: looked up only when its rows disagree
        -- (hashing beats sorting the window by task and time to find it).
        LEFT JOIN LATERAL (
            SELECT true AS found, c.quest, c.layer
            FROM cost_ledger c
            WHERE NOT (w.labelled AND w.quest = w.quest_max AND w.layer = w.layer_max)
              AND c.task_id = w.task_id AND c.ts = w.last_ts AND {_VALID}
            ORDER BY c.id DESC
            LIMIT 1
        ) latest ON true
    ),
    scored AS (
        SELECT t.*,
               (SELECT CASE WHEN i.impact_score IN ('NaN', 'Infinity', '-Infinity') THEN NULL
                            ELSE i.impact_score END
                FROM impact_ledger i
                WHERE i.task_id = t.task_id
                ORDER BY i.measured_at DESC NULLS LAST
                LIMIT 1) AS impact
        FROM tasks t
    ),
    wasted AS (
        SELECT * FROM scored
        WHERE tokens > %(waste_min_tokens)s
          AND (impact IS NULL OR impact <= %(waste_max_impact)s)
          AND last_ts < %(grace_cutoff)s
    ),
    families AS (
        SELECT * FROM unnest(%(raw_providers)s::text[], %(families)s::text[]) AS f(provider, family)
    ),
    providers AS (
        SELECT coalesce(f.family, %(other)s) AS family,
               sum(x.cost) AS cost,
               count(DISTINCT x.task_id) AS tasks,
               sum(x.tokens) AS tokens
        FROM (SELECT task_id, provider, cost, tokens FROM win
              UNION ALL
              SELECT task_id, provider, cost, tokens FROM before) x
        LEFT JOIN families f ON f.provider = x.provider
        GROUP BY 1
    )
    (SELECT 'efficiency' AS kind, task_id, quest, layer, cost, tokens, impact, 1::bigint AS tasks,
            NULL AS family
     FROM scored
     WHERE cost > 0 AND impact > 0
     ORDER BY impact / cost::float8 DESC, task_id COLLATE "C"
     LIMIT %(top_efficiency)s)
    UNION ALL
    (SELECT 'waste', task_id, quest, layer, cost, tokens, impact, 1, NULL
     FROM wasted
     ORDER BY tokens DESC, task_id COLLATE "C"
     LIMIT %(top_waste)s)
    UNION ALL
    SELECT 'waste_total', NULL, quest, layer, sum(cost), sum(tokens), NULL, count(*), NULL
    FROM wasted
    GROUP BY quest, layer
    UNION ALL
    SELECT 'quest', NULL, quest, NULL, sum(cost), sum(tokens), sum(impact), count(*), NULL
    FROM scored
    GROUP BY quest
    UNION ALL
    SELECT 'provider', NULL, NULL, NULL, cost, tokens, NULL, tasks, family
    FROM providers
    """,
)

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
           sum(c.cost_usd) AS cost,
           sum(c.input_tokens) AS input_tokens,
           sum(c.output_tokens) AS output_tokens
    FROM cost_ledger c
    WHERE c.ts < %(end)s AND {_VALID}
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
