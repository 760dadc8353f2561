"""SQL shared by the sources: row validity, exact sums, the snapshot, and backfill's queries.

Each source's own statements live in its module (exporter/sources/); they are composed only of
constant fragments like these, and values always travel as bind parameters.
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
TOKENS = "(c.input_tokens::numeric + c.output_tokens)"

# Costs are summed as numeric, also from a view whose column is a float: the sums are exact and
# independent of row order (a counter must never step back by an ulp), and the exporter adds
# them as Decimal. For a numeric column the cast is no operation at all.
COST = "c.cost_usd::numeric"


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


# --- Backfill (a one-off history export, not part of a refresh) ------------------------------

# Valid rows per hour from %(start)s to %(end)s, and one row per series of everything before.
HOURLY_SPEND = Query(
    "hourly_spend",
    f"""
    SELECT CASE WHEN c.ts < %(start)s THEN NULL
                ELSE date_bin('1 hour', c.ts, %(start)s) END AS hour,
           c.quest, c.layer, c.provider,
           count(*) AS calls,
           sum({COST}) AS cost,
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
