"""Running sums whose cost per refresh follows the new rows, and the watermark they rest on.

A source keeps *final* sums over ids <= the watermark plus a *tail* over the ids after it,
recomputed every refresh with an index range scan. The watermark only advances over rows that
can no longer appear: a refresh records an ``xmax`` (the first transaction id no transaction had
taken at its snapshot: past the snapshot's own, which is only the last completed id + 1, and
past every transaction id locked in ``pg_locks``; queries.SNAPSHOT) and the largest id it saw;
once a later snapshot's ``xmin`` reaches that ``xmax``, every transaction that could hold a
smaller id (an identity value is drawn inside the inserting transaction, before the larger id's
row committed) has finished. So a row that took id 100 and commits after id 101 is never
skipped. Ids assigned out of sequence (an explicit older id) are caught by the periodic full
reconciliation, which also bounds any drift.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

Count = int | Decimal


def count(value: int | Decimal) -> Count:
    """A sum of counts as an ``int`` when whole: PostgreSQL's sum of integers is a numeric,
    whole for every ``integer`` or ``bigint`` column; a ``numeric`` one with a fraction (which
    the contract allows) stays the exact ``Decimal`` it is."""
    whole = int(value)
    return whole if whole == value else value


class Sums(NamedTuple):
    """Exact running sums of ledger rows: what every cumulative counter is built from.

    Rows supply the same names (``queries.Columns.sums``); a NULL (an excluded row's cost or
    tokens, an optional column the relation lacks) adds nothing. The token categories are
    disjoint but for reasoning, which is part of output. A named tuple: a steady refresh adds
    thousands of them, and a frozen dataclass took twice as long to make. Counts are ``int``
    when whole (:func:`count`), a third of a ``Decimal``'s memory and faster to add.
    """

    calls: Count = 0
    cost: Decimal = Decimal(0)
    input_tokens: Count = 0
    output_tokens: Count = 0
    cache_read_tokens: Count = 0
    cache_write_tokens: Count = 0
    reasoning_tokens: Count = 0

    @classmethod
    def of(cls, row: Any) -> Sums:
        """The sums of one query row (a group of ledger rows)."""
        return cls._make(kind(getattr(row, name, None) or 0) for name, kind in _KINDS)

    def __add__(self, other: Sums) -> Sums:  # type: ignore[override]  # not concatenation
        return Sums(*map(operator.add, self, other))

    def __sub__(self, other: Sums) -> Sums:
        """What is left when ``other``, added before, is taken out again (exactly)."""
        return Sums(*map(operator.sub, self, other))


ZERO = Sums()
# How ``Sums.of`` reads each field, from its default: a Decimal stays one, a count is ``count``.
_KINDS = tuple((k, Decimal if isinstance(v, Decimal) else count) for k, v in ZERO._asdict().items())


@dataclass(frozen=True)
class Plan:
    """The id range one refresh reads, decided from its snapshot."""

    after: int | None  # read the ids after this one; None: the whole ledger (any id)
    safe: int  # ids up to this one are final: no transaction can still add a smaller one
    xmin: int
    xmax: int

    @property
    def full(self) -> bool:
        return self.after is None


@dataclass
class Watermark:
    """Which ids are final, and when the next full reconciliation is due."""

    reconcile_seconds: float
    frozen_id: int = -1  # the ``safe`` id of the last recorded refresh
    pending: list[tuple[int, int]] = field(default_factory=list)  # (xmax, largest id seen)
    largest_id: int = -1
    last_full: float | None = None

    def plan(self, xmin: int, xmax: int, now: float) -> Plan:
        """Decide what a refresh reads; changes nothing until :meth:`record`."""
        full = (
            self.last_full is None
            or self.reconcile_seconds <= 0
            or now - self.last_full >= self.reconcile_seconds
        )
        safe = max([self.frozen_id, *(m for x, m in self.pending if x <= xmin)])
        return Plan(after=None if full else self.frozen_id, safe=safe, xmin=xmin, xmax=xmax)

    @property
    def unseeded(self) -> bool:
        """Nothing is final or pending: no refresh has been recorded, nor a ``seed``."""
        return self.frozen_id < 0 and not self.pending

    def seed(self, xmax: int, largest: int) -> None:
        """Note, before an exporter's first refresh, the ``xmax`` of a snapshot taken in a
        transaction of its own and the largest id it saw, as a recorded refresh would: if every
        transaction running then has finished when the first refresh's snapshot is taken, the
        first refresh takes ids up to that one as final, and the second reads only the rows
        after them. Unseeded, the first refresh finds nothing final, and the second reads the
        whole ledger again."""
        self.pending.append((xmax, largest))

    def record(self, plan: Plan, largest: int | None, now: float) -> None:
        """Note what a refresh read under ``plan``: its final rows, and the largest id seen."""
        self.frozen_id = plan.safe
        self.largest_id = max(self.largest_id, -1 if largest is None else largest)
        self.pending = [(x, m) for x, m in self.pending if x > plan.xmin]
        self.pending.append((plan.xmax, self.largest_id))
        if plan.full:
            self.last_full = now
