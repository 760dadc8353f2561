"""Spend, tokens, calls and list prices: cumulative counters over the whole ledger.

SPEND_TOTALS folds the rows after the watermark into exact running sums per series, model and
price period (exporter/incremental.py), split by the recent spans a row's time falls in (the
window's whole days, whose spend and tokens decide which layers and models keep a label; this
month; today), so those sums follow the new rows too; the spans move at midnight, when it
reads the whole ledger again. List prices are applied to the exact sums (exporter/prices.py).

With more quests than ``max_quests``, QUEST_DAYS reads the spend per quest and day, the fold
decides which quests keep a label on which day (exporter/fold.py), and SPLIT_TOTALS reads the
rows of the quests whose label changed split where it changed, so each row counts under the
label of its day.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

import psycopg
from prometheus_client.metrics_core import Metric as Family
from psycopg.types.string import TextLoader

from exporter import catalog as c
from exporter.contract import TEXT
from exporter.days import DAY, midnights
from exporter.families import LabelGuard, Series, as_float
from exporter.fold import Fold, QuestDays, decide, quest_days
from exporter.incremental import ZERO, Count, Sums
from exporter.labels import LabelCleaner
from exporter.models import model_label, model_name, model_ref
from exporter.prices import PriceBook
from exporter.queries import (
    AFTER,
    BUDGET_DAYS,
    MOVED,
    REASONS,
    Columns,
    Output,
    Periods,
    Query,
)
from exporter.sources.base import Build, Excluded, Refresh, Source, Statement, streamed

# Which recent spans a row falls in (by its time): the label guard's window (whole days), this
# month, today. They move once a day, at midnight, when the source reads the whole ledger again;
# between midnights the spans' sums follow the new rows like the counters.
_RECENT = {
    "in_window": "c.ts >= %(weights_start)s",
    "in_month": "c.ts >= %(month_start)s",
    "in_today": "c.ts >= %(today_start)s",
}
_SPANS = tuple(_RECENT)

# The columns every spend statement returns (``Reading.fold`` reads them by name).
_OUTPUT = Output(
    {
        "kind": "NULL::text",
        "final": "NULL::boolean",
        "quest": "NULL",
        "layer": "NULL",
        "provider": "NULL",
        "model": "NULL",
        "period": "NULL::timestamptz",
        "reason": "NULL::text",
        **dict.fromkeys(_SPANS, "NULL::boolean"),
        **dict.fromkeys(Sums._fields, "NULL"),
        "max_id": "NULL::bigint",
        "segment": "NULL::integer",
    }
)
# A row's part (final: id <= %(safe)s, folded into the running totals; else the tail, added for
# this refresh only) and series, as most statements group them.
_SERIES = {
    "final": "c.id <= %(safe)s",
    "quest": "c.quest",
    "layer": "c.layer",
    "provider": "c.provider",
    "model": "c.model",
}


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
# come from EXCLUDED_ROWS, a second, filtered scan, sent only when this one saw excluded rows
# (its groups of kind 'excluded'). It was a branch of this statement, behind an init plan the
# executor checked before starting its scan; but PostgreSQL's JIT compiles a whole statement,
# branches that never run included, in each parallel worker: on Debian's PostgreSQL 15 (JIT
# on, its default) a clean whole-ledger read without the branch took 0.89 of the time with it
# at 10 M rows, 0.91 at 1 M (where the branch's cost alone put the statement past
# jit_above_cost); without JIT about as long (1.01 and 0.99). The largest id is read from the
# end of the primary key, not aggregated over every row.
@cache
def spend_totals(cols: Columns, periods: Periods, spans: bool = True) -> Query:
    """SPEND_TOTALS for a relation with these optional columns.

    With ``spans`` (a tail read) the sums are split by the recent spans; without (a read of the
    whole ledger) they are not, and RECENT_SUMS reads the spans from the recent rows alone:
    three more booleans per row of the whole history cost more than a scan of the window.
    """
    valid = f"{cols.valid} IS TRUE"  # grouped as a boolean (two groups), not by the CASE
    recent = _RECENT if spans else {}
    rows = _OUTPUT.select(
        kind=f"CASE WHEN {valid} THEN 'sum' ELSE 'excluded' END",
        **_SERIES,
        period=periods.column,
        **recent,
        **cols.aggregates(),
    )
    largest = _OUTPUT.select(
        kind="'largest'", max_id=f"(SELECT max(c.id) FROM cost_ledger c WHERE {AFTER})"
    )
    group_by = periods.group_by(
        _OUTPUT.by(*_SERIES), valid, *([_OUTPUT.by(*_SPANS)] if spans else [])
    )
    return Query(
        "spend_totals",
        f"""
    SELECT {rows}
    FROM cost_ledger c
    WHERE {AFTER}
    GROUP BY {group_by}
    UNION ALL
    SELECT {largest}
    """,
    )


# The rows SPEND_TOTALS left out, by reason, in the same snapshot: read only when it saw some.
@cache
def excluded_rows(cols: Columns) -> Query:
    keys = dict(_SERIES, model=_OUTPUT.nulls["model"], reason=cols.reason)  # by reason, not model
    return Query(
        "spend_totals",
        f"""
    SELECT {_OUTPUT.select(kind="'sum'", **keys, **cols.aggregates(["calls"]))}
    FROM cost_ledger c
    WHERE {AFTER} AND {cols.valid} IS NOT TRUE
    GROUP BY {_OUTPUT.by("final", "quest", "layer", "provider", "reason")}
    """,
    )


# The recent spans' sums of a whole-ledger read: the rows since the earlier of the window's whole
# days and the month, from the ts index.
@cache
def recent_sums(cols: Columns) -> Query:
    return Query(
        "spend_totals",
        f"""
    SELECT {_OUTPUT.select(kind="'recent'", **_SERIES, **_RECENT, **cols.aggregates())}
    FROM cost_ledger c
    WHERE c.ts >= %(recent_start)s AND {cols.valid}
    GROUP BY {_OUTPUT.by(*_SERIES, *_SPANS)}
    """,
    )


# The rows of the quests whose label changed between days (exporter/fold.py), split where it
# changed: the main scan cannot split them (the planner estimates an expression of ts at one
# group per row and sorts the whole ledger), and they are a few quests' rows.
@cache
def split_totals(cols: Columns, periods: Periods) -> Query:
    segment = "width_bucket(c.ts, %(bounds)s::timestamptz[])"
    rows = _OUTPUT.select(
        kind="'split'", **_SERIES, period=periods.column, **cols.aggregates(), segment=segment
    )
    return Query(
        "spend_totals",
        f"""
    SELECT {rows}
    FROM cost_ledger c
    WHERE {AFTER} AND {MOVED} AND {cols.valid}
    GROUP BY {periods.group_by(_OUTPUT.by(*_SERIES, "segment"))}
    """,
    )


# Python's datetime holds the years 1 to 9999; PostgreSQL's timestamptz from 4713 BC to
# 294276 AD. A row's time outside Python's (a day's margin for any time zone) is never loaded:
# one such row failed its query at every refresh. It still counts where its time need not be
# read ('-infinity' and 'infinity' are invalid).
_PYTHON_TIMES = "c.ts >= '0001-01-02 00:00:00+00' AND c.ts < '9999-12-31 00:00:00+00'"

# The oldest row's time, from the start of the ts index: is the history long? (Read as a
# timestamptz, as the newest call's: a view's timestamp without time zone is taken as UTC,
# the session's zone, as every comparison with it in a statement takes it.)
_OLDEST = f"SELECT min(c.ts)::timestamptz FROM cost_ledger c WHERE {_PYTHON_TIMES}"


# The newest valid call, from the end of the ts index.
@cache
def newest_call(cols: Columns) -> Query:
    return Query(
        "newest_call",
        f"SELECT c.ts::timestamptz AS ts FROM cost_ledger c WHERE {cols.valid} AND {_PYTHON_TIMES}"
        " ORDER BY c.ts DESC LIMIT 1",
    )


SPEND_TOTALS = spend_totals(Columns(), Periods(0))
"""The statement for a relation without the optional columns (tests, bench)."""


_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_token_values = attrgetter(*_TOKENS)


class Key(NamedTuple):
    """What the running totals are summed by."""

    quest: Any
    layer: Any
    provider: Any
    model: Any
    period: Any  # the price period (None: before every date the sums are split at)
    reason: Any  # the exclusion reason (None: valid)
    segment: int | None  # the fold's segment of a quest that changed label (None: one label)


@dataclass
class Spans:
    """The valid sums of the recent spans, as the families read them: the window's spend by
    raw layer and its spend and tokens by (provider, model), the label guard's weights; this
    month's and today's spend by raw quest. Summed so as rows fold, exactly, not kept per
    series and span: at 10 M rows in the window 4,271 such series' ``Sums`` held 1.9 MiB, twice
    while a whole-ledger read replaced them."""

    layer_cost: dict[Any, Decimal] = field(default_factory=dict)
    model_cost: dict[tuple[Any, Any], Decimal] = field(default_factory=dict)
    model_tokens: dict[tuple[Any, Any], Count] = field(default_factory=dict)
    month: dict[Any, Decimal] = field(default_factory=dict)  # by raw quest
    today: dict[Any, Decimal] = field(default_factory=dict)

    def add(self, r: Any, sums: Sums) -> None:
        """Add the valid ``sums`` of a row that says which spans it falls in."""
        if r.in_window:
            model = r.provider, r.model
            _put(self.layer_cost, r.layer, sums.cost)
            _put(self.model_cost, model, sums.cost)
            _put(self.model_tokens, model, sum(_token_values(sums)))
        if r.in_month:
            _put(self.month, r.quest, sums.cost)
            if r.in_today:
                _put(self.today, r.quest, sums.cost)

    def merged(self, tail: Spans) -> Spans:
        """These sums with ``tail``'s added (a new record: both are kept as they are)."""
        return Spans(
            *(_merged(mine, its) for mine, its in zip(_dicts(self), _dicts(tail), strict=True))
        )

    def copy(self) -> Spans:
        return Spans(*(dict(sums) for sums in _dicts(self)))


def _dicts(spans: Spans) -> tuple[dict[Any, Any], ...]:
    """A ``Spans``' sums, in the order of its fields."""
    return tuple(getattr(spans, f.name) for f in fields(Spans))


@dataclass
class SpendTotals:
    """Running totals of ``cost_ledger`` by id: final sums plus this refresh's tail.

    ``recent`` are the valid sums of the rows in the recent spans (window, month, today): the
    same final and tail parts, valid until the spans move at midnight.
    """

    final: dict[Key, Sums] = field(default_factory=dict)
    totals: dict[Key, Sums] = field(default_factory=dict)
    final_recent: Spans = field(default_factory=Spans)
    recent: Spans = field(default_factory=Spans)
    read: bool = False  # whether any refresh has folded a whole ledger yet

    def reading(self, full: bool) -> Reading:
        """A read to fold rows into: of the whole ledger when ``full``, else of the rows
        after the watermark, added to the final sums held."""
        if full:
            return Reading(full)
        return Reading(full, dict(self.final), final_recent=self.final_recent.copy())

    def take(self, reading: Reading) -> int | None:
        """The sums of a read whose every row folded; return the largest id it saw."""
        self.final, self.totals = reading.final, _merged(reading.final, reading.tail)
        self.final_recent = reading.final_recent
        self.recent = reading.final_recent.merged(reading.tail_recent)
        self.read = self.read or reading.full
        return reading.largest


@dataclass
class Reading:
    """The rows of SPEND_TOTALS (then EXCLUDED_ROWS', RECENT_SUMS' and SPLIT_TOTALS'), folded as
    they arrive, so that a read of the whole ledger never holds its rows: the totals change only
    when every row has folded (``SpendTotals.take``)."""

    full: bool
    final: dict[Key, Sums] = field(default_factory=dict)
    tail: dict[Key, Sums] = field(default_factory=dict)
    final_recent: Spans = field(default_factory=Spans)
    tail_recent: Spans = field(default_factory=Spans)
    quests: set[Any] = field(default_factory=set)  # the (raw) quests with valid sums
    models: set[tuple[Any, Any]] = field(default_factory=set)  # their (provider, model) pairs
    largest: int | None = None
    excluded: bool = False  # SPEND_TOTALS saw rows it left out: EXCLUDED_ROWS says why

    def fold(self, rows: Iterable[Any]) -> None:
        for r in rows:
            if r.kind == "largest":
                self.largest = r.max_id
                continue
            if r.kind == "excluded":
                self.excluded = True
                continue
            sums = Sums.of(r)
            if r.kind != "recent":
                key = Key(r.quest, r.layer, r.provider, r.model, r.period, r.reason, r.segment)
                _put(self.final if r.final else self.tail, key, sums)
                if r.kind == "sum" and r.reason is None:
                    self.quests.add(r.quest)
                    self.models.add((r.provider, r.model))
            if r.reason is None:
                (self.final_recent if r.final else self.tail_recent).add(r, sums)

    def drop(self, split: frozenset[Any]) -> None:
        """Take out the main scan's valid sums of the (raw) quests in ``split``: SPLIT_TOTALS'
        rows, folded next, count them split where their label changed."""
        for sums in (self.final, self.tail):
            # valid, and not one of SPLIT_TOTALS' segments
            taken = [k for k in sums if k.quest in split and k.reason is None and k.segment is None]
            for key in taken:
                del sums[key]


def moved_params(quests: frozenset[Any], bounds: tuple[datetime, ...]) -> dict[str, Any]:
    """Bind parameters of MOVED: these (raw) quests, split at these bounds."""
    return {
        "moved": sorted(quest for quest in quests if quest is not None),
        "moved_null": None in quests,
        "bounds": list(bounds),
    }


K = TypeVar("K")
N = TypeVar("N", Sums, Decimal, Count)


def _merged(final: dict[K, N], tail: dict[K, N]) -> dict[K, N]:
    out = dict(final)
    for key, value in tail.items():
        _put(out, key, value)
    return out


def _put(target: dict[K, N], key: K, value: N) -> None:
    """Add ``value`` to the sum ``target`` holds at ``key`` (the first: ``value`` itself)."""
    before = target.get(key)
    target[key] = value if before is None else before + value


class _InternedText(TextLoader):
    """Text as one string object per distinct value. Thousands of rows repeat a few quests,
    layers, providers and models, and a whole-ledger read's running sums then share their
    keys' strings with the sums they replace: 2.5 MiB less of the peak RSS of an exporter
    reconciling 10 M rows in the window (121.4 and 121.7 against 119.1 and 118.9 MiB)."""

    def load(self, data: Any) -> Any:
        value = super().load(data)
        return sys.intern(value) if isinstance(value, str) else value  # bytes: not asked UTF-8


class SpendSource(Source):
    """The cumulative spend, token, call and list-price counters, by series and by model;
    today's spend and the newest call."""

    queries = (SPEND_TOTALS.name, newest_call(Columns()).name)
    feeds = (
        c.SPEND,
        c.TOKENS,
        c.REASONING_TOKENS,
        c.CALLS,
        c.MODEL_SPEND,
        c.MODEL_TOKENS,
        c.MODEL_CALLS,
        c.LIST_PRICE,
        c.MODEL_LIST_PRICE,
        c.UNPRICED_CALLS,
        c.UNPRICED_TOKENS,
        c.LEDGER_LAST_CALL,
        c.QUEST_SPEND_TODAY,
        c.QUEST_SPEND_MONTH,
    )
    exclusions = tuple(("cost_ledger", reason) for reason in REASONS)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.totals = SpendTotals()
        self._counters = Counters()
        self._spans: date | None = None  # the day whose spans the recent sums hold
        self._newest: datetime | None = None
        self._long_history = False
        self._oldest: datetime | None = None
        self._quest = LabelCleaner(self.settings.max_label_length)
        self.fold: Fold | None = None  # None: every quest keeps its label every day
        self.quest_days = QuestDays()
        self._split: tuple[frozenset[Any], tuple[datetime, ...]] = (frozenset(), ())
        self._spent: tuple[LabelGuard, Series, Series] | None = None  # the last refresh's

    def statement(self, query: str, refresh: Refresh) -> Statement:
        if query != SPEND_TOTALS.name:
            return Statement(newest_call(refresh.columns).sql, {})
        # A new day moves the spans: read the whole ledger once more.
        same_day = self._spans == refresh.instants.today
        return self._main(refresh, refresh.plan.after if same_day else None)

    def rebuilds(self, query: str, refresh: Refresh) -> bool:
        return query == SPEND_TOTALS.name and self.statement(query, refresh).params["after"] is None

    def _main(self, refresh: Refresh, after: int | None) -> Statement:
        params: dict[str, Any] = {"after": after, "safe": refresh.plan.safe}
        params |= self.prices.params() | refresh.instants.params()
        # A whole-ledger read splits every row by span when the history is short (one scan),
        # and scans the recent rows apart when it is long (the history stays unsplit).
        spans = after is not None or not self._long_history
        sql = spend_totals(refresh.columns, self.prices.periods, spans=spans).sql
        return Statement(sql, params)

    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        statement = self.statement(query, refresh)
        if query != SPEND_TOTALS.name:
            rows = cur.execute(statement.sql, statement.params).fetchall()
            self._newest = rows[0].ts if rows else None
            return
        for name in TEXT:  # the text types a ledger's labels may have
            cur.adapters.register_loader(name, _InternedText)
        reading = self._scan(cur, refresh, statement.params["after"])
        fold, days, split = None, QuestDays(), frozenset[Any]()
        quests = set(reading.quests)
        if not reading.full:
            quests |= {key.quest for key in self.totals.totals if key.reason is None}
        if len({self._quest(quest) for quest in quests}) > self.settings.max_quests:
            days = self._days(cur, refresh)
            fold = decide(
                days.merged,
                days.allocated,
                refresh.instants.today,
                self.settings.max_quests,
                self.settings.fold_hold_days,
                self.settings.zone,
                previous=self.fold,
                since=days.since,
            )
            split = frozenset(quest for quest in quests if self._quest(quest) in fold.moved)
            if not reading.full and (split, fold.bounds) != self._split:
                # A quest's label changed where the running sums are not split: read it all.
                reading = self._scan(cur, refresh, None)
            if split:
                reading.drop(split)
                after = None if reading.full else statement.params["after"]
                params = statement.params | {"after": after}
                params |= moved_params(split, fold.bounds)
                sql = split_totals(refresh.columns, self.prices.periods).sql
                self._folded(cur, Statement(sql, params), reading)
        largest = self.totals.take(reading)
        self.fold, self.quest_days = fold, days
        self._split = (split, fold.bounds if fold else ())
        self._spans = refresh.instants.today
        refresh.watermark.record(refresh.plan, largest, refresh.clock)

    @property
    def split(self) -> dict[str, Any]:
        """The parameters that split the rows of the quests whose label changed."""
        return moved_params(*self._split)

    def _scan(self, cur: psycopg.Cursor[Any], refresh: Refresh, after: int | None) -> Reading:
        """The main scan's rows after ``after`` (the whole ledger when None), folded."""
        if after is None:
            # Long: the history before the recent spans is longer than the spans themselves.
            (oldest,) = cur.execute(_OLDEST).fetchone() or (None,)
            start = refresh.instants.params()["recent_start"]
            self._oldest = oldest
            self._long_history = oldest is not None and oldest < start - (
                refresh.instants.now - start
            )
        statement = self._main(refresh, after)
        reading = self._folded(cur, statement, self.totals.reading(after is None))
        # A model not seen before may change price on a date the sums are not split at: read
        # again, in the same snapshot, split there too (once: the models are known).
        if self.prices.cover(reading.models):
            statement = self._main(refresh, after)
            reading = self._folded(cur, statement, self.totals.reading(after is None))
        if reading.excluded:
            excluded = Statement(excluded_rows(refresh.columns).sql, statement.params)
            self._folded(cur, excluded, reading)
        if after is None and self._long_history:
            recent = Statement(recent_sums(refresh.columns).sql, statement.params)
            self._folded(cur, recent, reading)
        return reading

    @staticmethod
    def _folded(cur: psycopg.Cursor[Any], statement: Statement, reading: Reading) -> Reading:
        """``reading`` with a statement's rows folded in as they arrive."""
        with streamed(cur, statement) as rows:
            reading.fold(rows)
        return reading

    def _days(self, cur: psycopg.Cursor[Any], refresh: Refresh) -> QuestDays:
        """Spend per quest and day, and the allocations before today: the fold's input.

        Read whole when the fold starts and when the day turns, and by id in between.
        """
        today, zone = refresh.instants.today, self.settings.zone
        old = self.quest_days
        whole = old.first_day is None or old.today != today
        if whole:
            if self._oldest is None:
                (self._oldest,) = cur.execute(_OLDEST).fetchone() or (None,)
            first = self._oldest.astimezone(zone).date() if self._oldest else today
            budgets = Statement(
                BUDGET_DAYS.sql, {"first_day": first - DAY, "last_day": today - DAY}
            )
            allocated: dict[tuple[str, date], Decimal] = defaultdict(Decimal)
            with streamed(cur, budgets) as rows:
                for b in rows:
                    allocated[(self._quest(b.quest), b.day)] += b.allocated
            old = QuestDays(first_day=first, today=today, allocated=dict(allocated))
        assert old.first_day is not None
        params = {
            "after": None if whole else old.safe,
            "safe": refresh.plan.safe,
            "midnights": midnights(old.first_day, today + DAY, zone),
        }
        with streamed(cur, Statement(quest_days(refresh.columns).sql, params)) as rows:
            return old.folded(whole, rows, refresh.plan.safe, self._quest)

    @property
    def has_data(self) -> bool:
        return self.totals.read

    def ready(self, fresh: frozenset[str]) -> bool:
        # The newest call's time may lag a failing lookup; the counters are what must be fresh.
        return self.has_data and SPEND_TOTALS.name in fresh

    def weigh(self, labels: LabelGuard) -> None:
        # Every quest of the ledger competes for a label, decided day by day (exporter/fold.py);
        # layers by window spend; models by window spend and by window tokens (subscription
        # calls cost $0).
        # Every valid key offers its labels at weight 0: once per distinct value will do.
        valid = [k for k in self.totals.totals if k.reason is None]
        quests = frozenset(labels.quest(quest) for quest in {k.quest for k in valid})
        for layer in {k.layer for k in valid}:
            labels.weigh_layer(layer)
        for provider, model in {(k.provider, k.model) for k in valid}:
            labels.weigh_model(model_label(provider, model))
        labels.fold(self.fold, quests)
        # The window's spend and tokens per raw layer and model, summed exactly and converted
        # once: float sums would follow the rows' order, which differs between a steady refresh
        # and a full recomputation, and could tip a near tie for the last label.
        recent = self.totals.recent
        for layer, cost in recent.layer_cost.items():
            labels.weigh_layer(layer, float(cost))
        for (provider, model), cost in recent.model_cost.items():
            used = as_float(recent.model_tokens[provider, model])
            labels.weigh_model(model_label(provider, model), float(cost), used)

    def today(self, labels: LabelGuard) -> Series:
        """Spend since today's midnight per folded quest (quests with spend today)."""
        return self._per_quest(labels)[1]

    def _per_quest(self, labels: LabelGuard) -> tuple[Series, Series]:
        """This month's and today's spend per folded quest, in one pass per refresh (the
        budget families read today's too)."""
        if self._spent is not None and self._spent[0] is labels:
            return self._spent[1], self._spent[2]

        # Summed exactly and converted once: float sums would depend on the keys' order, which
        # differs between a steady refresh and a full recomputation.
        def folded(by_quest: dict[Any, Decimal]) -> Series:
            exact: dict[tuple[str, ...], Decimal] = {}
            for quest, cost in by_quest.items():
                _put(exact, (labels.q(quest),), cost)
            return {key: as_float(cost) for key, cost in exact.items()}

        spent = folded(self.totals.recent.month), folded(self.totals.recent.today)
        self._spent = (labels, *spent)
        return spent

    def build(self, build: Build) -> list[Family]:
        labels = build.labels
        counters = self._counters.series(
            self.totals.totals, labels, build.providers.family, self.prices
        )
        families = [build.family(metric, series) for metric, series in counters.items()]
        newest = self._newest
        if newest is not None and counters[c.SPEND]:
            families.append(build.family(c.LEDGER_LAST_CALL, {(): newest.timestamp()}))
        month, today = (dict(spent) for spent in self._per_quest(labels))  # zeros added below
        from exporter.sources.budget import BudgetSource  # budget reads today's spend from here

        budget = build.source(BudgetSource)
        if budget is not None:  # a quest with a budget has spent 0 rather than nothing
            for quest in budget.allocated(labels):
                today.setdefault(quest, 0.0)
            for quest in budget.allocated(labels, "month"):
                month.setdefault(quest, 0.0)
        families.append(build.family(c.QUEST_SPEND_TODAY, today))
        families.append(build.family(c.QUEST_SPEND_MONTH, month))
        return families

    def excluded(self) -> Excluded:
        out: Excluded = dict.fromkeys(self.exclusions, 0.0)
        for (_, _, _, _, _, reason, _), sums in self.totals.totals.items():
            if reason is not None:
                out[("cost_ledger", reason)] += float(sums.calls)
        return out


DIRECTIONS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_tokens"),
    ("cache_write", "cache_write_tokens"),
)
"""The ``direction`` label of the token families: disjoint, they sum to every token."""


def cumulative(
    totals: Mapping[Key, Sums],
    labels: LabelGuard,
    family: Callable[[str | None], str],
    prices: PriceBook,
) -> dict[c.MetricSpec, Series]:
    """Every cumulative counter's series from running totals (live, and backfill per hour).

    Sums are added exactly and converted to float once: float sums in a different order
    (several raw providers fold into one family) can differ in the last bit between
    refreshes, and a counter that steps back by one ulp is a reset to Prometheus. List prices
    are applied to the exact sums of one model in one price period.
    """
    groups = _Groups(_Labels(labels, family), prices)
    for key, s in totals.items():
        groups.change(key, s, 1)
    return groups.series()


class Counters:
    """``cumulative``'s series, kept from one refresh to the next.

    A steady refresh changes the sums of some keys (those with new rows: about 230 of 1,489
    after 1,000 new rows, at 1 M rows a month), so the exact group sums are kept, and a
    changed key's old sums taken out and its new ones put back: exact (ints, and Decimals
    within their 28 digits, as every sum here), so the same as summing again. Everything is
    summed again when more than half the keys changed, when a key is gone
    (a whole-ledger read), when the prices are others, or when a label a key's sums go to
    changed (the guard decides again every refresh).
    """

    def __init__(self) -> None:
        self._seen: dict[Key, Sums] = {}
        self._groups: _Groups | None = None

    def series(
        self,
        totals: Mapping[Key, Sums],
        labels: LabelGuard,
        family: Callable[[str | None], str],
        prices: PriceBook,
    ) -> dict[c.MetricSpec, Series]:
        seen, groups = self._seen, self._groups
        # Changed in place below: until that is done, the next refresh sums everything again.
        self._groups = None
        changed = [(key, s) for key, s in totals.items() if seen.get(key) is not s]
        now = _Labels(labels, family) if groups is None else groups.labels.again(labels, family)
        if (
            groups is None
            or 2 * len(changed) > len(totals)  # summing again costs less
            or groups.prices is not prices
            or not seen.keys() <= totals.keys()
            or now != groups.labels
        ):
            groups, changed, seen = _Groups(now, prices), list(totals.items()), {}
        groups.labels = now  # the same labels, from this refresh's guard (for new values)
        for key, s in changed:
            old = seen.get(key)
            if old is not None:
                groups.change(key, old, -1)
            groups.change(key, s, 1)
        self._seen, self._groups = dict(totals), groups
        return groups.series()


class _Labels:
    """The labels a key's sums go to, each derived once per distinct value (the guard does
    not change during a refresh)."""

    def __init__(self, labels: LabelGuard, family: Callable[[str | None], str]) -> None:
        self._labels, self._family = labels, family
        # (quest, segment) -> (counted, counted_now). counted None: rows of days its quest was
        # kept, which no longer is (that series is gone). The series today's rows will count
        # in (counted_now) exists from the start, at 0: one that appears when a quest moves in
        # or out of ``other`` would lose its first increase.
        self.quests: dict[tuple[Any, Any], tuple[Any, Any]] = {}
        self.layers: dict[tuple[Any, Any], str] = {}  # (quest, layer) -> layer label
        # (provider, model) -> (family, model reference, (family, model label))
        self.models: dict[tuple[Any, Any], tuple[str, str | None, tuple[str, str]]] = {}

    def of(self, key: Key) -> tuple[Any, str, tuple[str, str | None, tuple[str, str]]]:
        """(counted, counted_now), the layer label, (family, model reference, model series)."""
        quest, layer, provider, model, _, _, segment = key
        q = self.quests.get((quest, segment))
        if q is None:
            q = self._quest(quest, segment)
        lay = self.layers.get((quest, layer))
        if lay is None:
            lay = self._layer(quest, layer)
        m = self.models.get((provider, model))
        if m is None:
            m = self._model(provider, model)
        return q, lay, m

    def again(self, labels: LabelGuard, family: Callable[[str | None], str]) -> _Labels:
        """The labels of the same values under another refresh's guard."""
        out = _Labels(labels, family)
        for quest, segment in self.quests:
            out._quest(quest, segment)
        for quest, layer in self.layers:
            out._layer(quest, layer)
        for provider, model in self.models:
            out._model(provider, model)
        return out

    def __eq__(self, other: object) -> bool:
        """Whether both give the same labels to the same values."""
        if not isinstance(other, _Labels):
            return NotImplemented
        return (self.quests, self.layers, self.models) == (
            other.quests,
            other.layers,
            other.models,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _quest(self, quest: Any, segment: Any) -> tuple[Any, Any]:
        q = self.quests[quest, segment] = (
            self._labels.counted(quest, segment),
            self._labels.counted_now(quest),
        )
        return q

    def _layer(self, quest: Any, layer: Any) -> str:
        lay = self.layers[quest, layer] = self._labels.ql(quest, layer)[1]
        return lay

    def _model(self, provider: Any, model: Any) -> tuple[str, str | None, tuple[str, str]]:
        m = self.models[provider, model] = _model_labels(
            provider, model, self._labels, self._family
        )
        return m


class _Groups:
    """The exact sums of the cumulative counters' series, by the labels of their keys, and
    their series as last published: a steady refresh converts only the groups it changed."""

    def __init__(self, labels: _Labels, prices: PriceBook) -> None:
        self.labels, self.prices = labels, prices
        self.by_series = _Changing[Sums]()
        self.by_model = _Changing[Sums]()
        self.listed = _Changing[Decimal]()
        self.listed_model = _Changing[Decimal]()
        self.unpriced = _Changing[Sums]()
        self._published: dict[c.MetricSpec, Series] | None = None

    def _all(self) -> tuple[_Changing[Any], ...]:
        return self.by_series, self.by_model, self.listed, self.listed_model, self.unpriced

    def change(self, key: Key, s: Sums, sign: int) -> None:
        """Add (sign 1) or take out (-1) the sums of one key (of a valid row; an excluded
        row's key counts nowhere here)."""
        if key.reason is not None:
            return
        (counted, counted_now), layer_label, (fam, ref, per_model) = self.labels.of(key)
        series = None if counted is None else (counted, layer_label, fam)
        now = None if counted_now is None else (counted_now, layer_label, fam)
        self.by_model.change(per_model, s, sign)
        if series is not None:
            self.by_series.change(series, s, sign)
        if now is not None and now not in self.by_series:
            self.by_series.change(now, ZERO, 1)
        price = self.prices.price(fam, ref, key.period)
        if price is None:
            self.unpriced.change(per_model, s, sign)
            return
        if now is not None and now not in self.listed:
            self.listed.change(now, Decimal(0), 1)
        value = price.value(s)
        self.listed_model.change(per_model, value, sign)
        if series is not None:
            self.listed.change(series, value, sign)

    def series(self) -> dict[c.MetricSpec, Series]:
        """Every series, converted to float once per change of its exact sums."""
        last, catalogue = self._published, self.prices.catalogue
        if last is None:
            out = _floats(self._all(), catalogue)
        else:
            part = _floats([groups.changes() for groups in self._all()], catalogue)
            out = {metric: {**last[metric], **part[metric]} for metric in last}
        for groups in self._all():
            groups.changed.clear()
        self._published = out
        return out


V = TypeVar("V", Sums, Decimal)


class _Changing(dict[tuple[str, ...], V]):
    """Exact group sums that note which groups changed (a group is never dropped: a key
    that is gone makes ``Counters`` sum everything again)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed: set[tuple[str, ...]] = set()

    def change(self, group: tuple[str, ...], value: V, sign: int) -> None:
        """Add (sign 1) or take out (-1) ``value``."""
        old = self.get(group)
        if old is None:
            self[group] = value
        else:
            self[group] = old + value if sign > 0 else old - value
        self.changed.add(group)

    def changes(self) -> dict[tuple[str, ...], V]:
        """The groups changed since ``changed`` was last cleared, with their sums."""
        return {group: self[group] for group in self.changed}


def _floats(
    groups: Sequence[Mapping[tuple[str, ...], Any]], catalogue: str
) -> dict[c.MetricSpec, Series]:
    """The cumulative counters' series of group sums (``_Groups._all``'s order)."""
    by_series, by_model, listed, listed_model, unpriced = groups
    return {
        c.SPEND: {k: as_float(s.cost) for k, s in by_series.items()},
        c.TOKENS: _tokens(by_series),
        c.REASONING_TOKENS: {k: as_float(s.reasoning_tokens) for k, s in by_series.items()},
        c.CALLS: {k: as_float(s.calls) for k, s in by_series.items()},
        c.MODEL_SPEND: {k: as_float(s.cost) for k, s in by_model.items()},
        c.MODEL_TOKENS: _tokens(by_model),
        c.MODEL_CALLS: {k: as_float(s.calls) for k, s in by_model.items()},
        c.LIST_PRICE: {(*k, catalogue): as_float(v) for k, v in listed.items()},
        c.MODEL_LIST_PRICE: {(*k, catalogue): as_float(v) for k, v in listed_model.items()},
        c.UNPRICED_CALLS: {k: as_float(s.calls) for k, s in unpriced.items()},
        c.UNPRICED_TOKENS: _tokens(unpriced),
    }


def _model_labels(
    provider: str, model: str | None, labels: LabelGuard, family: Callable[[str | None], str]
) -> tuple[str, str | None, tuple[str, str]]:
    """A raw provider and model's family, model reference, and (family, model label)."""
    fam = family(provider)
    ref = model_ref(provider, model)
    return fam, ref, (fam, labels.m(model_name(ref)))


def _tokens(sums: Mapping[tuple[str, ...], Sums]) -> Series:
    return {
        (*key, direction): as_float(getattr(s, attr))
        for key, s in sums.items()
        for direction, attr in DIRECTIONS
    }
