"""Cumulative ledger sums whose cost per refresh follows the new rows, not the history.

The totals are kept as *final* sums over ids <= ``frozen_id`` plus a *tail* over the ids after
it, recomputed every refresh with an index range scan. The watermark only advances over rows
that can no longer appear: a refresh records the ``xmax`` of its snapshot and the largest id it
saw; once a later snapshot's ``xmin`` reaches that ``xmax``, every transaction that could hold a
smaller id (an identity value is drawn inside the inserting transaction, before the larger id's
row committed) has finished. So a row that took id 100 and commits after id 101 is never
skipped. Ids assigned out of sequence (an explicit older id) are caught by the periodic full
reconciliation, which also bounds any drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

Key = tuple[Any, Any, Any, Any]  # quest, layer, provider, exclusion reason (None: valid)


@dataclass(frozen=True)
class SpendRow:
    """One group of the whole ledger, in the shape the families are built from."""

    quest: str | None
    layer: str | None
    provider: str | None
    reason: str | None
    calls: int
    cost: Decimal | None
    input_tokens: Decimal | None
    output_tokens: Decimal | None
    cost_window: Decimal | None
    cost_today: Decimal | None
    last_ts: datetime | None


@dataclass(frozen=True)
class Plan:
    """The id range one refresh reads, decided from its snapshot."""

    after: int | None  # read the ids after this one; None: the whole ledger (any id)
    safe: int
    xmin: int
    xmax: int

    @property
    def full(self) -> bool:
        return self.after is None


@dataclass
class SpendTotals:
    """Running totals of ``cost_ledger`` by id; see the module docstring."""

    reconcile_seconds: float
    final: dict[Key, list[Decimal]] = field(default_factory=dict)
    frozen_id: int = -1
    pending: list[tuple[int, int]] = field(default_factory=list)  # (xmax, largest id seen)
    largest_id: int = -1
    last_full: float | None = None
    totals: dict[Key, list[Decimal]] = field(default_factory=dict)

    def plan(self, xmin: int, xmax: int, now: float) -> Plan:
        """Decide what to read; changes nothing until :meth:`apply` succeeds."""
        full = (
            self.last_full is None
            or self.reconcile_seconds <= 0
            or now - self.last_full >= self.reconcile_seconds
        )
        safe = max([self.frozen_id, *(m for x, m in self.pending if x <= xmin)])
        return Plan(after=None if full else self.frozen_id, safe=safe, xmin=xmin, xmax=xmax)

    def apply(self, plan: Plan, rows: Iterable[Any], now: float) -> None:
        """Fold the rows of the SPEND_TOTALS query read under ``plan`` into the totals.

        Nothing changes unless every row folds: a row that cannot leaves the totals as they were.
        """
        final = {} if plan.full else {key: list(values) for key, values in self.final.items()}
        tail: dict[Key, list[Decimal]] = {}
        largest = self.largest_id
        for r in rows:
            if r.kind == "largest":
                largest = max(largest, -1 if r.max_id is None else r.max_id)
                continue
            key = (r.quest, r.layer, r.provider, r.reason)
            _add(final if r.final else tail, key, r)
        self.final = final
        self.frozen_id = plan.safe
        self.pending = [(x, m) for x, m in self.pending if x > plan.xmin]
        self.pending.append((plan.xmax, largest))
        self.largest_id = largest
        if plan.full:
            self.last_full = now
        totals = {key: list(values) for key, values in self.final.items()}
        for key, values in tail.items():
            acc = totals.setdefault(key, [Decimal(0)] * 4)
            for i, v in enumerate(values):
                acc[i] += v
        self.totals = totals


def _add(target: dict[Key, list[Decimal]], key: Key, r: Any) -> None:
    acc = target.setdefault(key, [Decimal(0)] * 4)
    acc[0] += r.calls
    acc[1] += r.cost or 0
    acc[2] += r.input_tokens or 0
    acc[3] += r.output_tokens or 0


def merge(totals: Mapping[Key, list[Decimal]], recent: Iterable[Any]) -> list[SpendRow]:
    """Join the cumulative totals with the windowed sums of SPEND_RECENT."""
    windows: dict[tuple[Any, Any, Any], Any] = {}
    newest = None
    for r in recent:
        if r.kind == "newest":
            newest = r.last_ts
        else:
            windows[(r.quest, r.layer, r.provider)] = r
    out = []
    for (quest, layer, provider, reason), (calls, cost, tokens_in, tokens_out) in totals.items():
        valid = reason is None
        w = windows.get((quest, layer, provider)) if valid else None
        out.append(
            SpendRow(
                quest=quest,
                layer=layer,
                provider=provider,
                reason=reason,
                calls=int(calls),
                cost=cost if valid else None,
                input_tokens=tokens_in if valid else None,
                output_tokens=tokens_out if valid else None,
                cost_window=w.cost_window if w else None,
                cost_today=w.cost_today if w else None,
                last_ts=newest if valid else None,
            )
        )
    return out
