"""List prices: what a call would have cost at its provider's public API price.

Prices come from `genai-prices` (an offline catalogue kept by Pydantic), looked up under the
price provider of the call's family (``ProviderRule.price_provider``), overridden or completed
by the ``prices`` setting. A call whose model has no price is never guessed: it adds nothing
to a list price and is counted as unpriced.

The catalogue's prices change on dates it records; the cumulative sums are kept per *price
period* (the interval between two such dates), so each token is priced at the price of its
day and history keeps its value when the calendar moves on. An upgrade of the catalogue (or a
change of the ``prices`` setting) may price history differently: the list-price counters carry
the ``catalogue`` label that says which prices they use, so such a change starts new series
instead of rewriting old ones (a reset or a jump to Prometheus).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from exporter.config import DEFAULT_PROVIDER_RULES, ConfigError, PriceOverride, ProviderRule
from exporter.incremental import Sums
from exporter.models import model_name, model_ref
from exporter.queries import Periods

MILLION = Decimal(1_000_000)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Price:
    """USD per million tokens of each category (cache prices default to the input price)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal

    def value(self, s: Sums) -> Decimal:
        """The list price of exact token sums (reasoning is part of output)."""
        return (
            s.input_tokens * self.input
            + s.output_tokens * self.output
            + s.cache_read_tokens * self.cache_read
            + s.cache_write_tokens * self.cache_write
        ) / MILLION


def _base(value: Any) -> Decimal | None:
    """A catalogue price; a tiered one at its base tier (sums cannot say which call crossed)."""
    if value is None:
        return None
    return Decimal(getattr(value, "base", value))


def _price(input: Any, output: Any, cache_read: Any, cache_write: Any) -> Price | None:
    i, o = _base(input), _base(output)
    if i is None or o is None:
        return None
    return Price(i, o, _base(cache_read) or i, _base(cache_write) or i)


@functools.cache
def _providers(ids: frozenset[str]) -> dict[str, Any]:
    """The catalogue's providers of these ids (those it has), read afresh from the package's
    data module and not kept there: the rest are let go (by default 42 of 47 providers, 2,044
    of 2,330 models) instead of cached for the process' life by ``genai_prices.data_snapshot``.
    Their space is reused by what the ledger costs later: a served exporter reconciling 10 M
    rows peaks about 2.7 MiB lower (docs/performance.md). Always the bundled catalogue, which
    the ``catalogue`` label names. Cached by the ids: reading the module takes about 20 ms."""
    spec = importlib.util.find_spec("genai_prices.data")
    assert spec is not None and spec.loader is not None  # the pinned version bundles it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {p.id: p for p in module.providers if p.id in ids}


class PriceBook:
    """The list price of a model in a price period, from the catalogue and the overrides."""

    def __init__(
        self,
        rules: tuple[ProviderRule, ...],
        overrides: tuple[PriceOverride, ...],
        family: Callable[[str | None], str],
    ) -> None:
        from genai_prices import __version__

        providers = _providers(frozenset(r.price_provider for r in rules if r.price_provider))
        self._provider_of: dict[str, Any] = {}
        for rule in rules:
            if rule.price_provider is None:
                continue
            if rule.price_provider not in providers:
                raise ConfigError(
                    f"setting 'providers': price_provider {rule.price_provider!r} of family"
                    f" {rule.family!r} is not in genai-prices {__version__}"
                )
            self._provider_of[rule.family] = providers[rule.price_provider]
        self._overrides = {(o.provider, o.model): o for o in overrides}
        self.catalogue = f"genai-prices-{__version__}"
        """Which prices the list-price counters use (their ``catalogue`` label): the
        catalogue's version, and a digest of the settings when they change its prices."""
        mapping = [(r.family, r.price_provider) for r in rules]
        if overrides or mapping != [(r.family, r.price_provider) for r in DEFAULT_PROVIDER_RULES]:
            digest = json.dumps([[o.model_dump(mode="json") for o in overrides], mapping])
            self.catalogue += "+" + hashlib.sha256(digest.encode()).hexdigest()[:8]
        self._cache: dict[tuple[str, str | None, datetime | None], Price | None] = {}
        self._family = family
        self.split: tuple[datetime, ...] = ()
        """Where every sum of this exporter is split into price periods: each date on which a
        model the ledger has changes price (grown as models appear; finer is never wrong)."""

    @property
    def periods(self) -> Periods:
        """The SQL of the current split (its dates are bound by :meth:`params`)."""
        return Periods(len(self.split))

    def params(self) -> dict[str, datetime]:
        return Periods.params(self.split)

    def cover(self, calls: Iterable[tuple[str | None, str | None]]) -> bool:
        """Split also where these (raw provider, model) pairs change price; True if that
        grew the split (rows summed without it must be read again)."""
        dates = self.dates_of(calls)
        if dates <= set(self.split):
            return False
        self.split = tuple(sorted(dates | set(self.split)))
        return True

    def dates_of(self, calls: Iterable[tuple[str | None, str | None]]) -> set[datetime]:
        """The dates (UTC midnights) on which the catalogue changes the price of a model of
        these (raw provider, model) pairs: the sums must be split there."""
        out: set[datetime] = set()
        for provider, model in calls:
            found = self._model(self._family(provider), model_ref(provider, model))
            if found is not None and isinstance(found.prices, list):
                out.update(
                    datetime.combine(p.constraint.start_date, datetime.min.time(), UTC)
                    for p in found.prices
                    if isinstance(getattr(p.constraint, "start_date", None), date)
                )
        return out

    def price(self, family: str, ref: str | None, period: datetime | None) -> Price | None:
        """The price of a model reference of a provider family in a price period (its first
        instant; None: before every date the sums are split at), or None."""
        key = (family, ref, period)
        if key not in self._cache:
            self._cache[key] = self._lookup(family, ref, period)
        return self._cache[key]

    def _model(self, family: str, ref: str | None) -> Any:
        """The catalogue's model of a reference (None: an override prices it, or none)."""
        name = model_name(ref)
        provider = self._provider_of.get(family)
        if ref is None or name is None or provider is None:
            return None
        if (family, name) in self._overrides or (None, name) in self._overrides:
            return None
        return provider.find_model(ref) or provider.find_model(name)

    def _lookup(self, family: str, ref: str | None, period: datetime | None) -> Price | None:
        name = model_name(ref)
        if name is None or ref is None:
            return None
        for override in (self._overrides.get((family, name)), self._overrides.get((None, name))):
            if override is not None:
                return _price(
                    override.input_usd_per_mtok,
                    override.output_usd_per_mtok,
                    override.cache_read_usd_per_mtok,
                    override.cache_write_usd_per_mtok,
                )
        model = self._model(family, ref)
        if model is None:
            return None
        p = model.get_prices(period or EPOCH)
        return _price(p.input_mtok, p.output_mtok, p.cache_read_mtok, p.cache_write_mtok)
