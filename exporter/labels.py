"""Label hygiene: provider families, cleaned label values and the cardinality guard."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from functools import lru_cache

from exporter.catalog import OTHER
from exporter.config import ProviderRule

UNKNOWN = "unknown"
"""Label value for NULL or empty ledger text."""


class ProviderFamilies:
    """Classify raw provider/model strings with the first matching rule."""

    def __init__(self, rules: Iterable[ProviderRule]) -> None:
        self._rules = [(re.compile(r.pattern, re.IGNORECASE), r.family) for r in rules]
        self._cache: dict[str | None, str] = {}

    @property
    def families(self) -> tuple[str, ...]:
        """Return every family label value this classifier can produce, ``other`` last."""
        return (*dict.fromkeys(family for _, family in self._rules), OTHER)

    def family(self, raw: str | None) -> str:
        """Return the family of one raw provider string (``other`` when nothing matches)."""
        if raw not in self._cache:
            self._cache[raw] = next(
                (family for pattern, family in self._rules if raw and pattern.search(raw)), OTHER
            )
        return self._cache[raw]


class LabelCleaner:
    """Make ledger text safe as a label value, counting the distinct values it altered."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.altered: set[str | None] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            self.altered.add(value)
            return UNKNOWN
        cleaned = _clean(value, self.max_length)
        if cleaned != value:
            self.altered.add(value)
        return cleaned


@lru_cache(maxsize=65536)
def _clean(value: str, max_length: int) -> str:
    """A label value without control characters, capped; cached: every refresh asks again."""
    cleaned = "".join(ch for ch in value if unicodedata.category(ch) != "Cc")[:max_length]
    return cleaned if cleaned.strip() else UNKNOWN


def keep_top(weights: Mapping[str, float], limit: int) -> frozenset[str]:
    """Return the ``limit`` heaviest keys (ties by name); the rest fold into ``other``."""
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))
    return frozenset(key for key, _ in ranked[:limit])
