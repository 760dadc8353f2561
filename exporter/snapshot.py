"""Immutable snapshots of the exposition: rendered once per refresh, served to every scrape."""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.exposition import Families, TextRenderer, openmetrics

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
GZIP_LEVEL = 1
"""gzip's fastest level: every refresh compresses the text anew. At 10 M rows in the window
(856 kB of text) level 1 took 2.6 ms and made 101 kB, the default level 6 8.2 ms and 83 kB:
a tenth of a steady refresh for 18 kB less a scrape (docs/performance.md)."""


@dataclass(frozen=True)
class Snapshot:
    """One refresh's metric families and their rendered exposition.

    The text format and its gzip are rendered once, by the refresh, so a scrape only copies
    bytes and a burst of scrapers on a new snapshot does not compress it fifty times over.
    OpenMetrics (what Prometheus asks for) is made on first use from the text's lines and
    cached: its gzip too, so only the first scrape after a refresh waits for them.
    """

    families: tuple[Family, ...]
    text: bytes
    text_gzip: bytes
    fresh_until: float = math.inf
    """Unix time until which its data counts as fresh: the last refresh in which every query
    succeeded, plus the staleness bound (``-inf``: none has). ``/-/ready`` says whether now is
    before it."""
    lines: tuple[list[str] | None, ...] | None = None
    """Each family's sample lines in ``text`` (``exporter.exposition.Rendering``), which
    OpenMetrics reuses (None: rendered by the library, which OpenMetrics is too)."""

    @classmethod
    def of(
        cls,
        families: Sequence[Family],
        fresh_until: float = math.inf,
        renderer: TextRenderer | None = None,
    ) -> Snapshot:
        """Render ``families``; a refresher's ``renderer`` reuses its last rendering's lines."""
        fams = tuple(families)
        text, lines = renderer.render(fams) if renderer else (generate_latest(Families(fams)), None)
        gz = gzip.compress(text, compresslevel=GZIP_LEVEL, mtime=0)
        return cls(fams, text, gz, fresh_until, lines)

    @property
    def fresh(self) -> bool:
        return time.time() <= self.fresh_until

    @cached_property
    def openmetrics(self) -> bytes:
        if self.lines is not None:
            return openmetrics(self.families, self.lines)
        # prometheus-client's OpenMetrics renderer carries no annotations.
        return bytes(generate_openmetrics(Families(self.families)))  # type: ignore[no-untyped-call]

    @cached_property
    def openmetrics_gzip(self) -> bytes:
        return gzip.compress(self.openmetrics, compresslevel=GZIP_LEVEL, mtime=0)

    def body(self, *, openmetrics: bool, compressed: bool) -> bytes:
        """Return the exposition in the negotiated encoding."""
        if openmetrics:
            return self.openmetrics_gzip if compressed else self.openmetrics
        return self.text_gzip if compressed else self.text
