"""What every source of ledger families is: statements, the state they fold into, families.

A source is one query group, in the manner of postgres_exporter's collectors: its SQL, the
state it keeps between refreshes and the families it builds sit in one module. The refresher
runs each statement under its own savepoint and knows nothing of what a source computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import psycopg
from prometheus_client.metrics_core import Metric as Family

from exporter.catalog import MetricSpec
from exporter.config import Settings
from exporter.days import local_midnight
from exporter.families import LabelGuard, Samples, family_of
from exporter.incremental import Plan, Watermark
from exporter.labels import ProviderFamilies
from exporter.prices import PriceBook
from exporter.queries import Columns

Excluded = dict[tuple[str, ...], float]
"""Excluded rows by (relation, reason)."""


@dataclass(frozen=True)
class Instants:
    """The boundaries one refresh computes its windows from."""

    now: datetime
    today: date
    today_start: datetime
    window_start: datetime
    grace_cutoff: datetime
    month_first: date  # the 1st of this month, in the configured zone
    month_last: date
    month_start: datetime  # midnight of the 1st
    month_end: datetime  # midnight of the next month's 1st
    weights_start: datetime  # midnight window_days before today: the label guard's window

    @classmethod
    def at(cls, now: datetime, settings: Settings) -> Instants:
        local = now.astimezone(settings.zone)
        first = local.date().replace(day=1)
        following = (first + timedelta(days=31)).replace(day=1)

        def midnight(day: date) -> datetime:
            return local_midnight(day, settings.zone)

        return cls(
            now=now,
            today=local.date(),
            today_start=midnight(local.date()),
            window_start=now - timedelta(days=settings.window_days),
            grace_cutoff=now - timedelta(hours=settings.grace_hours),
            month_first=first,
            month_last=following - timedelta(days=1),
            month_start=midnight(first),
            month_end=midnight(following),
            weights_start=midnight(local.date() - timedelta(days=settings.window_days)),
        )

    def params(self) -> dict[str, Any]:
        """The bind parameters every statement may use."""
        return {
            "today": self.today,
            "today_start": self.today_start,
            "window_start": self.window_start,
            "month_first": self.month_first,
            "month_last": self.month_last,
            "month_start": self.month_start,
            "weights_start": self.weights_start,
            # What the recent spans read: the earlier of the window's days and the month.
            "recent_start": min(self.weights_start, self.month_start),
        }


@dataclass(frozen=True)
class Refresh:
    """What one refresh knows when it runs a statement."""

    instants: Instants
    plan: Plan
    watermark: Watermark
    clock: float  # Unix time, for the reconciliation schedule
    columns: Columns  # the optional cost_ledger columns the statements may use


class Statement(NamedTuple):
    """One SQL statement and its bind parameters."""

    sql: str
    params: dict[str, Any]


CHUNK_ROWS = 200
"""How many rows a stream brings at a time. A large result is never held whole (a rebuild's
row per window task; a whole-ledger read's thousands of groups, on top of the sums they
replace; a long history's spend per quest and day), nor many of its rows at once: a rebuild's
chunks of 2,000 rows cost the served exporter 1.4 MiB more peak RSS at 10 M rows in the window
(109.9, 110.0 and 110.3 against 108.3 and 108.8 MiB), for no speed (full refreshes 20.6, 20.6
and 18.5 s against 17.7, 19.7 and 17.9 s, alternating in one process)."""


@contextmanager
def streamed(
    cur: psycopg.Cursor[Any], statement: Statement, binary: bool = False
) -> Iterator[Iterator[Any]]:
    """A statement's rows as they arrive, ``CHUNK_ROWS`` at a time (one at a time with a libpq
    before 17, which has no chunked mode), so that a large result is never held whole. A stream
    holds the connection's lock until it is closed: closed here at once if its reader fails
    (or Ctrl-C stops it), or the savepoint's rollback would wait on it."""
    size = CHUNK_ROWS if psycopg.capabilities.has_stream_chunked() else 1
    stream = cur.stream(statement.sql, statement.params, size=size, binary=binary)
    with closing(cast(Generator[Any, None, None], stream)) as rows:
        yield rows


S = TypeVar("S", bound="Source")


class Build:
    """What a source's families are built with: labels, classifier, the other sources, and
    the exporter's samples as last built."""

    def __init__(
        self,
        labels: LabelGuard,
        providers: ProviderFamilies,
        settings: Settings,
        ready: Mapping[type[Source], Source],
        samples: Samples | None = None,
    ) -> None:
        self.labels = labels
        self.providers = providers
        self.settings = settings
        self._ready = ready
        self.samples = Samples() if samples is None else samples

    def family(self, metric: MetricSpec, series: Mapping[tuple[str, ...], float]) -> Family:
        """One family of these series (``families.family_of``), reusing the unchanged ones'
        samples."""
        return family_of(metric, series, self.samples)

    def source(self, kind: type[S]) -> S | None:
        """Another source whose data is fresh, or None (its families are left out)."""
        found = self._ready.get(kind)
        return found if isinstance(found, kind) else None


class Source(ABC):
    """One query group: its statements, the state it folds them into, and its families."""

    queries: ClassVar[tuple[str, ...]]
    """The ``query`` label of each statement, in the order a refresh runs them."""
    feeds: ClassVar[tuple[MetricSpec, ...]]
    """The ledger families this source alone builds (the catalog test holds it to that)."""
    exclusions: ClassVar[tuple[tuple[str, str], ...]] = ()
    """Every (relation, reason) for which it counts excluded rows, zeros included."""

    def __init__(self, settings: Settings, providers: ProviderFamilies, prices: PriceBook) -> None:
        self.settings = settings
        self.providers = providers
        self.prices = prices

    @abstractmethod
    def statement(self, query: str, refresh: Refresh) -> Statement:
        """The SQL and parameters of one of its queries in this refresh."""

    @abstractmethod
    def read(self, query: str, cur: psycopg.Cursor[Any], refresh: Refresh) -> None:
        """Run one query and fold its result in; on any error nothing held changes."""

    def rebuilds(self, query: str, refresh: Refresh) -> bool:
        """Whether the query reads the whole ledger or window in this refresh (it then runs
        under ``rebuild_timeout_seconds``; a query that never does keeps the statement one)."""
        return False

    @property
    @abstractmethod
    def has_data(self) -> bool:
        """Whether it has read enough to build its families."""

    def ready(self, fresh: frozenset[str]) -> bool:
        """Whether its families are published, given the queries whose data is fresh."""
        return self.has_data and all(q in fresh for q in self.queries)

    def weigh(self, labels: LabelGuard) -> None:  # noqa: B027 (optional hook)
        """Offer its quests and layers (with their window spend) to the cardinality guard."""

    @abstractmethod
    def build(self, build: Build) -> list[Family]:
        """Its families, from the state it holds."""

    def excluded(self) -> Excluded:
        """Rows it left out, by (relation, reason)."""
        return {}
