"""The ledger contract: relations, columns and accepted types, and a check of a live database.

Users map their own tables through views, so types are checked by family (any integer type
where the DDL says bigint, any text type where it says text), not by exact name.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import psycopg
from psycopg.rows import dict_row

INTEGER = ("bigint", "integer", "smallint", "numeric")
NUMBER = ("numeric", "double precision", "real", "bigint", "integer", "smallint")
TEXT = ("text", "character varying", "character")
TIMESTAMPTZ = ("timestamp with time zone",)
DATE = ("date",)

CONTRACT: dict[str, dict[str, tuple[str, ...]]] = {
    "cost_ledger": {
        "id": INTEGER,
        "ts": TIMESTAMPTZ,
        "task_id": TEXT,
        "quest": TEXT,
        "layer": TEXT,
        "provider": TEXT,
        "model": TEXT,
        "input_tokens": INTEGER,
        "output_tokens": INTEGER,
        "cost_usd": NUMBER,
    },
    "impact_ledger": {
        "task_id": TEXT,
        "title": TEXT,
        "quest": TEXT,
        "layer": TEXT,
        "impact_score": NUMBER,
        "measured_at": TIMESTAMPTZ,
    },
    "quest_budget_allocations": {
        "quest": TEXT,
        "day": DATE,
        "allocated_usd": NUMBER,
    },
}

OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "cost_ledger": {
        "cache_read_tokens": INTEGER,
        "cache_write_tokens": INTEGER,
        "reasoning_tokens": INTEGER,
    },
}
"""Columns a relation may lack: the exporter then reads them as 0 (``queries.Columns``)."""

_COLUMNS = """
    SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type
    FROM pg_attribute a
    WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
"""


def schema_sql() -> str:
    """Return the DDL that creates the contract's tables and indexes."""
    return files("exporter").joinpath("sql/schema.sql").read_text(encoding="utf-8")


def check_relations(conn: psycopg.Connection[Any], notes: list[str] | None = None) -> list[str]:
    """Return one message per contract violation; an empty list means the ledger conforms.

    Optional columns the relation lacks are not violations: each adds a line to ``notes``.
    """
    problems: list[str] = []
    for relation, columns in CONTRACT.items():
        row = conn.execute(
            "SELECT to_regclass(%(r)s)::oid AS oid,"
            " CASE WHEN to_regclass(%(r)s) IS NOT NULL"
            " THEN has_table_privilege(to_regclass(%(r)s), 'SELECT') END AS readable",
            {"r": relation},
        ).fetchone()
        oid, readable = (row[0], row[1]) if row else (None, None)
        if oid is None:
            problems.append(f"{relation}: relation does not exist (create it or a view)")
            continue
        if not readable:
            problems.append(f"{relation}: the exporter's role has no SELECT privilege on it")
        found = {r[0]: r[1] for r in conn.execute(_COLUMNS, {"oid": oid}).fetchall()}
        optional = OPTIONAL.get(relation, {})
        for column, accepted in (columns | optional).items():
            if column in found and found[column] not in accepted:
                problem = (
                    f"{relation}.{column}: type {found[column]} is not one of {', '.join(accepted)}"
                )
                if accepted == TEXT:  # a uuid task id, say: its text is what the ledger means
                    problem += f" (a view can cast it: {column}::text)"
                problems.append(problem)
            elif column not in found and column in optional:
                if notes is not None:
                    notes.append(f"{relation}.{column}: optional column not found (read as 0)")
            elif column not in found:
                problems.append(f"{relation}.{column}: column is missing")
    return problems


# The columns the window's lookup of a task's earlier rows reads besides (task_id, ts): the
# covering index INCLUDEs them (an absent optional column has no attnum and is not required).
_LOOKUP_READS = (
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
_ATTNUMS = ",\n".join(
    f"(SELECT attnum FROM pg_attribute WHERE attrelid = c.oid AND attname = '{column}') AS {alias}"
    for alias, column in (
        ("id", "id"),
        ("ts", "ts"),
        ("task", "task_id"),
        ("provider", "provider"),
        ("model", "model"),
        *((column, column) for column in _LOOKUP_READS),
    )
)
_COVERED = ", ".join(f"t.{column}" for column in ("provider", "model", *_LOOKUP_READS))
_ADVICE = f"""
    WITH t AS (
        SELECT c.oid, c.relkind, {_ATTNUMS}
        FROM pg_class c
        WHERE c.oid = to_regclass('cost_ledger')
    )
    SELECT t.relkind IN ('r', 'p') AS is_table,
           EXISTS (SELECT FROM pg_index i WHERE i.indrelid = t.oid AND i.indkey[0] = t.id)
               AS id_index,
           EXISTS (SELECT FROM pg_index i WHERE i.indrelid = t.oid AND i.indkey[0] = t.ts)
               AS ts_index,
           EXISTS (SELECT FROM pg_index i
                   WHERE i.indrelid = t.oid AND i.indkey[0] = t.task AND i.indkey[1] = t.ts)
               AS task_ts_index,
           NOT EXISTS (SELECT FROM pg_index i
                       WHERE i.indrelid = t.oid AND i.indkey[0] = t.task AND i.indkey[1] = t.ts)
           OR EXISTS (SELECT FROM pg_index i
                      WHERE i.indrelid = t.oid AND i.indkey[0] = t.task AND i.indkey[1] = t.ts
                        AND i.indkey::int2[] @> array_remove(ARRAY[{_COVERED}]::int2[], NULL))
               AS task_ts_covering,
           EXISTS (SELECT FROM pg_statistic_ext s
                   WHERE s.stxrelid = t.oid AND 'd' = ANY (s.stxkind)
                     AND s.stxkeys::int2[] @> ARRAY[t.task, t.provider, t.model]::int2[])
               AS task_provider_stats,
           NOT EXISTS (SELECT FROM pg_class i WHERE i.oid = to_regclass('impact_ledger')
                         AND i.relkind IN ('r', 'p'))
           OR EXISTS (SELECT FROM pg_index i
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                      WHERE i.indrelid = to_regclass('impact_ledger')
                        AND a.attname = 'measured_at')
               AS impact_measured_index
    FROM t
"""

ADVICE = {
    "id_index": (
        "no index on cost_ledger (id): every refresh scans the whole ledger instead of the rows"
        " after its watermark"
    ),
    "ts_index": "no index on cost_ledger (ts): every window query scans the whole ledger",
    "task_ts_index": (
        "no index on cost_ledger (task_id, ts): each window task's earlier spend is found by"
        " scanning the ledger"
    ),
    "task_ts_covering": (
        "the cost_ledger (task_id, ts) index does not INCLUDE every column the window's history"
        " lookup reads (provider, model, cost and token columns): it reads the table too;"
        " recreate it"
    ),
    "task_provider_stats": (
        "no ndistinct statistics on cost_ledger (task_id, provider, model): the window is"
        " sorted instead of hashed"
    ),
    "impact_measured_index": (
        "no index on impact_ledger (measured_at): every refresh scans impact_ledger to find the"
        " impacts measured since the last one"
    ),
}
"""What ``schema.sql`` creates for the exporter's queries, and what its absence costs."""


def performance_advice(conn: psycopg.Connection[Any]) -> list[str]:
    """Return one line per index or statistics object of ``schema.sql`` that the ledger lacks.

    Only for tables: a view's indexes live on its base tables, which this cannot see.
    """
    found = conn.cursor(row_factory=dict_row).execute(_ADVICE).fetchone()
    if found is None:
        return []
    return [
        f"{text} (see exporter/sql/schema.sql)"
        for key, text in ADVICE.items()
        if not found[key] and (found["is_table"] or key.startswith("impact_"))
    ]
    return [
        f"{text} (see exporter/sql/schema.sql)" for key, text in ADVICE.items() if not found[key]
    ]
