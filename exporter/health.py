"""The exporter's own health: per-query outcomes, refresh counters and timestamps.

Totals and failures are separate families (never a status label), so ``rate()`` works on each.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric as Family

from exporter import __version__
from exporter import catalog as c
from exporter.families import LedgerFamilies, family_of, info_family


def source_label(name: str) -> str:
    """A source's ``source`` label: its class name without "Source", in lower case."""
    return name.removesuffix("Source").lower()


@dataclass
class QueryHealth:
    """Outcome of one named query, across refreshes."""

    success: bool = False
    duration: float = 0.0
    database: float = 0.0
    """Of ``duration``, the time spent waiting for PostgreSQL (statements and streamed rows);
    the rest is the exporter's Python, folding the rows in."""
    last_success: float | None = None
    errors: int = 0
    failing: int = 0
    """Consecutive failures; logs back off on it."""


@dataclass
class Health:
    """Everything the exporter reports about itself."""

    interval: float
    queries: dict[str, QueryHealth]
    window: float = 0.0  # seconds; settings a dashboard shows next to what they shape
    grace: float = 0.0
    started: float = 0.0
    refreshes: int = 0
    failures: int = 0
    skipped: int = 0
    build_failing: int = 0
    """Consecutive refreshes whose ledger families could not be built; logs back off on it."""
    render_failing: int = 0
    """Consecutive renderings that fell back to prometheus-client's (or failed with it too);
    logs back off on it."""
    refresh_duration: float = 0.0
    build_seconds: dict[str, float] = field(default_factory=dict)
    """Time each source took to build its families in the last refresh."""
    render_seconds: float | None = None
    """Time the last refresh took to render the exposition (text and gzip): published by the
    next refresh, which renders after building its families."""
    last_refresh: float | None = None
    last_success: float | None = None
    database_up: bool = False
    ledger: LedgerFamilies = field(default_factory=LedgerFamilies)

    def families(self) -> list[Family]:
        """Build the health families of the current state."""
        info = info_family(
            c.BUILD_INFO, {"version": __version__, "python_version": platform.python_version()}
        )
        qs = sorted(self.queries.items())
        fams = [
            info,
            family_of(c.QUERY_SUCCESS, {(n,): float(h.success) for n, h in qs}),
            family_of(c.QUERY_DURATION, {(n,): h.duration for n, h in qs}),
            family_of(c.QUERY_DATABASE, {(n,): h.database for n, h in qs}),
            family_of(
                c.QUERY_LAST_SUCCESS,
                {(n,): h.last_success for n, h in qs if h.last_success is not None},
            ),
            family_of(c.QUERY_ERRORS, {(n,): float(h.errors) for n, h in qs}),
            family_of(c.REFRESHES, {(): float(self.refreshes)}),
            family_of(c.REFRESH_FAILURES, {(): float(self.failures)}),
            family_of(c.REFRESH_SKIPPED, {(): float(self.skipped)}),
            family_of(c.REFRESH_DURATION, {(): self.refresh_duration}),
            family_of(
                c.BUILD_DURATION,
                {(source_label(k),): v for k, v in sorted(self.build_seconds.items())},
            ),
            family_of(
                c.RENDER_DURATION,
                {} if self.render_seconds is None else {(): self.render_seconds},
            ),
            family_of(c.START_TIME, {(): self.started}),
            family_of(c.REFRESH_INTERVAL, {(): self.interval}),
            family_of(c.WINDOW, {(): self.window}),
            family_of(c.GRACE, {(): self.grace}),
            family_of(c.DATABASE_UP, {(): float(self.database_up)}),
            family_of(c.FOLDED_LABELS, {(k,): float(v) for k, v in self.ledger.folded.items()}),
            family_of(c.CLEANED_LABELS, {(k,): float(v) for k, v in self.ledger.cleaned.items()}),
            family_of(c.SERIES, {(): float(self.ledger.series)}),
        ]
        if self.last_refresh is not None:
            fams.append(family_of(c.LAST_REFRESH, {(): self.last_refresh}))
        if self.last_success is not None:
            fams.append(family_of(c.LAST_SUCCESS, {(): self.last_success}))
        return fams
