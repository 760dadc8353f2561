"""SQL shared by the sources: row validity, exact sums, the snapshot, and backfill's queries.

Each source's own statements live in its module (exporter/sources/); they are composed only of
constant fragments like these, and values always travel as bind parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from exporter.incremental import Sums

OPTIONAL_TOKENS = ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
"""Optional cost_ledger columns: a relation without one of them reads it as 0."""
TOKENS = ("input_tokens", "output_tokens", *OPTIONAL_TOKENS)
"""Every token column of cost_ledger, the required ones first."""

SUMS = Sums._fields
"""The exact sums of a group of rows, in ``incremental.Sums`` order."""


@dataclass(frozen=True)
class Columns:
    """Which optional cost_ledger columns the relation has: the SQL is written for them.

    Every statement that tests a row's validity is built from one of these, so a relation
    without the optional columns works as one with them all NULL.
    """

    present: frozenset[str] = frozenset()
    integer: frozenset[str] = frozenset(TOKENS[:2])
    """The token columns (required, and optional present) of an integer type (by default the
    required ones, as the schema's). Any other (``numeric``, which the contract allows, or a
    float in a view) may hold NaN or infinity, which make a row invalid, and is summed as
    ``numeric``; an integer column is neither tested for them nor cast, a cost per row."""

    def _finite(self, column: str) -> bool:
        return column in self.integer

    def _tested(self) -> tuple[str, ...]:
        """The token columns a row's validity tests: the required ones, the optional present."""
        return tuple(col for col in TOKENS if col not in OPTIONAL_TOKENS or col in self.present)

    def _count(self, column: str) -> str:
        """A token column as summed: as ``numeric`` unless of an integer type (exact from a
        float; no operation for a numeric), a NULL of its type when an optional one is absent."""
        ref = self.ref(column)
        return ref if self._finite(column) or column not in self._tested() else f"{ref}::numeric"

    def ref(self, column: str) -> str:
        """The column of alias ``c``, or a NULL of its type when an optional one is absent."""
        if column in OPTIONAL_TOKENS and column not in self.present:
            return "NULL::bigint"
        return f"c.{column}"

    @property
    def checks(self) -> tuple[tuple[str, str], ...]:
        """Why a cost_ledger row is left out of every sum, tested in this order.

        A row that passes all checks is valid. NaN compares greater than every number in
        PostgreSQL, hence its own test; a token count may not be negative, infinite or NaN
        (a numeric or float column): NaN sorts above infinity in both types, so
        ">= 'Infinity'" catches both (in the column's own type: a numeric past float8's range
        is a valid count, not an error). An optional one may be NULL (0), a required one not.
        """
        bad = "".join(
            f" OR c.{col} < 0" + ("" if self._finite(col) else f" OR c.{col} >= 'Infinity'")
            for col in self._tested()
        )
        return (
            ("null_timestamp", "c.ts IS NULL"),
            ("infinite_timestamp", "c.ts IN ('infinity', '-infinity')"),
            ("null_cost", "c.cost_usd IS NULL"),
            ("nan_cost", "c.cost_usd = 'NaN'"),
            ("negative_cost", "c.cost_usd < 0"),
            ("infinite_cost", "c.cost_usd = 'Infinity'"),
            (
                "invalid_tokens",
                "c.input_tokens IS NULL OR c.output_tokens IS NULL" + bad,
            ),
        )

    @property
    def reason(self) -> str:
        """A cost_ledger row's (alias c) exclusion reason, NULL when it is valid."""
        tests = " ".join(f"WHEN {test} THEN '{reason}'" for reason, test in self.checks)
        return f"CASE {tests} END"

    @property
    def valid(self) -> str:
        """The same test as "no exclusion reason", as a plain conjunction.

        The planner can estimate it from column statistics (it cannot see through the CASE,
        guessed 0.2 % of rows valid, and chose joins that scan the whole ledger). NULLs fail
        every comparison (a NULL ts too), NaN fails "< 'Infinity'"; a timestamp of
        'infinity' or '-infinity' is in no day, window or epoch microsecond.
        """
        tokens = ""
        for col in self._tested():
            test = f"c.{col} >= 0"
            if not self._finite(col):
                test += f" AND c.{col} < 'Infinity'"
            if col in OPTIONAL_TOKENS:
                test = f"c.{col} IS NULL OR ({test})"
            tokens += f" AND ({test})"
        return f"""(c.ts > '-infinity' AND c.ts < 'infinity' AND c.cost_usd >= 0
             AND c.cost_usd < 'Infinity'{tokens})"""

    def sums(self, names: Sequence[str] = SUMS) -> str:
        """The exact sums every cumulative counter is built from (``incremental.Sums``).

        ``names`` picks some of them: every aggregate widens the hashed or sorted groups.
        """
        exprs = self.aggregates(names)
        return ",\n           ".join(f"{exprs[name]} AS {name}" for name in names)

    def aggregates(self, names: Sequence[str] = SUMS) -> dict[str, str]:
        """The aggregate expression of each of these sums, by name."""
        exprs = {
            "calls": "count(*)",
            "cost": f"sum({COST})",
            **{col: f"sum({self._count(col)})" for col in TOKENS},
        }
        return {name: exprs[name] for name in names}


REASONS = tuple(reason for reason, _ in Columns().checks)
"""Every exclusion reason of cost_ledger rows (the same whatever columns are present)."""

# Costs are summed as numeric, also from a view whose column is a float: the sums are exact and
# independent of row order (a counter must never step back by an ulp), and the exporter adds
# them as Decimal. For a numeric column the cast is no operation at all.
COST = "c.cost_usd::numeric"


@dataclass(frozen=True)
class Output:
    """The columns a source's statements return, in order, each with the NULL a statement
    without it returns (typed where its type is always the same: the planner then sizes it, and
    the branches of a UNION agree; a ledger column's type is the ledger's).

    Rows are read by column name; a statement names the columns it has (``select``) and groups
    by their positions (``by``), never by a position typed by hand.
    """

    nulls: Mapping[str, str]

    def select(self, **given: str) -> str:
        """A select list: each ``given`` expression as its column, NULL as every other one."""
        self._known(given)
        return ",\n           ".join(
            f"{given.get(name, null)} AS {name}" for name, null in self.nulls.items()
        )

    def by(self, *names: str) -> str:
        """These columns by their positions in the select list (a GROUP BY's references)."""
        self._known(names)
        positions = {name: i for i, name in enumerate(self.nulls, 1)}
        return ", ".join(str(positions[name]) for name in names)

    def _known(self, names: Iterable[str]) -> None:
        unknown = set(names) - self.nulls.keys()
        if unknown:
            raise ValueError(f"not an output column: {sorted(unknown)}")


@dataclass(frozen=True)
class Query:
    """A named statement; the name is the ``query`` label of the health metrics."""

    name: str
    sql: str


@dataclass(frozen=True)
class Periods:
    """The price periods of a row (alias c), split at %(d0)s, %(d1)s... (ascending dates).

    ``column`` is the period's first instant: the latest date at or before the row's time
    (NULL before them all). The sums are grouped by one boolean per date, never by that
    expression itself: the planner estimates an expression of ``ts`` at one group per row and
    sorts the ledger instead of hashing it, a boolean at two groups. With no dates (no model of
    the ledger changes price) the statements group exactly as without periods.
    """

    dates: int

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(f"(c.ts >= %(d{i})s)" for i in range(self.dates))

    @property
    def column(self) -> str:
        if not self.dates:
            return "NULL::timestamptz"
        whens = " ".join(
            f"WHEN {flag} THEN %(d{i})s::timestamptz"
            for i, flag in reversed(list(enumerate(self.flags)))
        )
        return f"CASE {whens} END"

    def group_by(self, *positions: int | str) -> str:
        """A GROUP BY of the select list's ``positions`` (or expressions) and the period's
        flags."""
        return ", ".join((*map(str, positions), *self.flags))

    @staticmethod
    def params(dates: Sequence[datetime]) -> dict[str, datetime]:
        return {f"d{i}": d for i, d in enumerate(dates)}


# The first transaction id that no transaction had taken when the snapshot was taken, as far
# as PostgreSQL shows it. A snapshot's own xmax is only the last *completed* id + 1: a
# transaction that took its id after that completion is in no snapshot's running list (and
# does not hold xmin back), so the watermark would take ids as final while it may still commit
# a smaller one. Every transaction with an id holds a lock on it (pg_locks, the live lock
# table, readable by any role); there ids are 32 bits, widened with the snapshot's epoch
# (running ids lie within 2**31 of xmax). A standby shows none of its primary's transactions
# there: it falls back to xmax.
_ASSIGNED = """(
        SELECT greatest(s.m, max(w.x + CASE WHEN w.x > s.m + 2147483648 THEN -4294967296
                                            WHEN w.x < s.m - 2147483648 THEN 4294967296
                                            ELSE 0 END) + 1)
        FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS m) s
        LEFT JOIN LATERAL (
            SELECT floor(s.m / 4294967296) * 4294967296 + l.transactionid::text::numeric AS x
            FROM pg_locks l WHERE l.locktype = 'transactionid'
        ) w ON true
        GROUP BY s.m)"""

# The snapshot of the refresh's transaction: every transaction with an id below ``xmin`` has
# finished; none had taken an id at or above ``xmax`` (``_ASSIGNED``). And which optional
# columns cost_ledger has, and which token columns are of an integer type (a view may be
# redefined at any time): ``snapshot_params``.
SNAPSHOT = Query(
    "snapshot",
    f"""
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::numeric AS xmin,
           {_ASSIGNED} AS xmax,
           ARRAY(SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = to_regclass('cost_ledger') AND a.attnum > 0
                   AND NOT a.attisdropped AND a.attname = ANY (%(optional)s)) AS columns,
           ARRAY(SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = to_regclass('cost_ledger') AND a.attnum > 0
                   AND NOT a.attisdropped AND a.attname = ANY (%(tokens)s)
                   AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype))
               AS integer_columns
    """,
)


def snapshot_params(columns: bool = True) -> dict[str, list[str]]:
    """SNAPSHOT's parameters: the columns it looks up (``columns`` False: none, only the
    snapshot itself)."""
    return {
        "optional": list(OPTIONAL_TOKENS) if columns else [],
        "tokens": list(TOKENS) if columns else [],
    }


# Before an exporter's first refresh, in a transaction of its own: what a refresh would note
# for the watermark (its ``xmax`` as SNAPSHOT's, and the largest id it sees), so that the first
# refresh can already take those ids as final (exporter/incremental.py, ``Watermark.seed``).
SEED = Query(
    "seed",
    f"""
    SELECT {_ASSIGNED} AS xmax, (SELECT max(c.id) FROM cost_ledger c) AS largest
    """,
)


# --- Backfill (a one-off history export, not part of a refresh) ------------------------------


AFTER = "(%(after)s::bigint IS NULL OR c.id > %(after)s)"
"""The rows after id %(after)s (an index range scan of the primary key); %(after)s NULL: every
row, whatever its id (the test folds away: statements are planned with their parameters)."""

MOVED = "(c.quest = ANY(%(moved)s) OR (%(moved_null)s AND c.quest IS NULL))"
"""A row of a quest whose label changed between days (exporter/fold.py)."""


@cache
def hourly_spend(cols: Columns, periods: Periods) -> Query:
    """Valid rows per hour from %(start)s to %(end)s, one row per series for all before; the
    rows of a quest whose label changed are split where it changed (%(bounds)s)."""
    return Query(
        "hourly_spend",
        f"""
        SELECT CASE WHEN c.ts < %(start)s THEN NULL
                    ELSE date_bin('1 hour', c.ts, %(start)s) END AS hour,
               c.quest, c.layer, c.provider, c.model, {periods.column} AS period,
               CASE WHEN {MOVED} THEN width_bucket(c.ts, %(bounds)s::timestamptz[])
                    ELSE 0 END AS segment,
               {cols.sums()}
        FROM cost_ledger c
        WHERE c.ts < %(end)s AND {cols.valid}
        GROUP BY {periods.group_by(1, 2, 3, 4, 5, 7)}
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
