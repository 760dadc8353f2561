"""The sources of the ledger families, in the order a refresh runs them, and their assembly.

Adding a source: a module here (its SQL, state and families), an entry in :func:`sources`, its
catalog entries; the refresher, the health families and the catalog test pick it up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from exporter import catalog as c
from exporter.config import Settings
from exporter.families import LabelGuard, LedgerFamilies, Samples
from exporter.labels import ProviderFamilies
from exporter.prices import PriceBook
from exporter.sources.base import Build, Excluded, Instants, Refresh, Source, Statement
from exporter.sources.budget import BudgetSource
from exporter.sources.spend import SpendSource
from exporter.sources.window import WindowSource

__all__ = [
    "KINDS",
    "BudgetSource",
    "Instants",
    "Refresh",
    "Source",
    "SpendSource",
    "Statement",
    "WindowSource",
    "build_ledger",
    "sources",
]


KINDS: tuple[type[Source], ...] = (SpendSource, BudgetSource, WindowSource)
"""Every source, in the order a refresh runs them."""


def sources(settings: Settings, providers: ProviderFamilies) -> tuple[Source, ...]:
    """A fresh instance of every source, in refresh order, sharing one price book."""
    prices = PriceBook(settings.providers, settings.prices, providers.family)
    return tuple(kind(settings, providers, prices) for kind in KINDS)


def build_ledger(
    ready: Sequence[Source],
    settings: Settings,
    providers: ProviderFamilies,
    samples: Samples | None = None,
) -> LedgerFamilies:
    """Build the ledger families of the sources whose data is fresh.

    A source left out (never succeeded, or stale) leaves its families out entirely: a gap in
    Grafana, not a flat line of old numbers. Excluded rows are one family that every source
    reporting exclusions adds its relation's reasons to. ``samples``: the refresher's, reused
    where a series kept its value.
    """
    labels = LabelGuard(settings)
    for source in ready:
        source.weigh(labels)
    labels.decide()
    build = Build(labels, providers, settings, {type(s): s for s in ready}, samples)
    out = LedgerFamilies(labels=labels)
    excluded: Excluded = {}
    for source in ready:
        started = time.perf_counter()
        out.families += source.build(build)
        excluded |= source.excluded()
        out.build_seconds[type(source).__name__] = time.perf_counter() - started
    if excluded:
        out.families.append(build.family(c.LEDGER_EXCLUDED_ROWS, excluded))
    out.folded = labels.folded
    out.cleaned = labels.cleaned()
    return out
