"""Immutable snapshots of the exposition: rendered once per refresh, served to every scrape."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric as Family

from exporter.exposition import Families, TextRenderer, openmetrics

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
GZIP_LEVEL = 1
"""gzip's fastest level: every refresh compresses the text anew. At 10 M rows in the window
(856 kB of text) level 1 took 2.6 ms and made 101 kB, the default level 6 8.2 ms and 83 kB:
a tenth of a steady refresh for 18 kB less a scrape (docs/performance.md)."""
_GZIP_WBITS = 31  # zlib's window of 2**15 bytes, written as gzip
_PIECES = 256  # pieces of a rendering compressed at a time: lines of about 100 bytes


@dataclass(frozen=True)
class Snapshot:
    """One refresh's metric families and their rendered exposition.

    The text format's gzip is made once, by the refresh, so a scrape only copies bytes and a
    burst of scrapers on a new snapshot does not compress it fifty times over. OpenMetrics
    (what Prometheus asks for) is made from the text's lines, and kept gzipped too: by the
    refresh once a scrape has asked for it, before that on its first scrape. Neither is kept
    uncompressed (856 kB each at 10 M rows in the window, against about 100 kB gzipped): a
    scrape that does not take gzip gets it decompressed, once a snapshot."""

    families: tuple[Family, ...]
    text_gzip: bytes
    fresh_until: float = math.inf
    """Unix time until which its data counts as fresh: the last refresh in which every query
    succeeded, plus the staleness bound (``-inf``: none has). ``/-/ready`` says whether now is
    before it."""
    lines: tuple[list[str] | None, ...] | None = None
    """Each family's sample lines in the text (``exporter.exposition.Rendering``), which
    OpenMetrics reuses (None: rendered by the library, which OpenMetrics is too)."""

    @classmethod
    def of(
        cls,
        families: Sequence[Family],
        fresh_until: float = math.inf,
        renderer: TextRenderer | None = None,
        openmetrics: bool = False,
    ) -> Snapshot:
        """Render ``families``; a refresher's ``renderer`` reuses its last rendering's lines.
        With ``openmetrics``, make OpenMetrics now too (``served_openmetrics``)."""
        fams = tuple(families)
        if renderer is None:
            text = generate_latest(Families(fams)).decode("utf-8")
            snapshot = cls(fams, _gzip([text]), fresh_until)
        else:
            pieces, lines = renderer.render(fams)
            snapshot = cls(fams, _gzip(pieces), fresh_until, lines)
        if openmetrics:
            snapshot.openmetrics_gzip  # noqa: B018  # made now, cached: not on the first scrape
        return snapshot

    @classmethod
    def received(cls, text_gzip: bytes, openmetrics_gzip: bytes, fresh_until: float) -> Snapshot:
        """A snapshot rebuilt from its gzipped expositions (exporter/serverprocess.py): it can
        be served, not rendered again (no families)."""
        snapshot = cls((), text_gzip, fresh_until)
        snapshot.__dict__["openmetrics_gzip"] = openmetrics_gzip  # as the cached_property keeps it
        return snapshot

    @property
    def fresh(self) -> bool:
        return time.time() <= self.fresh_until

    @cached_property
    def text(self) -> bytes:
        return _gunzip(self.text_gzip)

    @cached_property
    def openmetrics_gzip(self) -> bytes:
        return _gzip(openmetrics(self.families, self.lines))

    @cached_property
    def openmetrics(self) -> bytes:
        return _gunzip(self.openmetrics_gzip)

    @property
    def served_openmetrics(self) -> bool:
        """Whether OpenMetrics was made for this snapshot (a scrape asked for it): the next
        refresh makes it too, so that Prometheus's first scrape after it does not wait for it
        on the event loop, where it held every other scrape (about 4 ms at 1 M rows in the
        window, 2.4 of them gzip, which a refresh runs without the GIL)."""
        return "openmetrics_gzip" in self.__dict__

    def body(self, *, openmetrics: bool, compressed: bool) -> bytes:
        """Return the exposition in the negotiated encoding."""
        if openmetrics:
            return self.openmetrics_gzip if compressed else self.openmetrics
        return self.text_gzip if compressed else self.text


def _gunzip(data: bytes) -> bytes:
    """What ``gzip.decompress`` makes of one gzip member (``_gzip``'s), decompressed into one
    buffer of the length its trailer gives (modulo 2**32: only the first guess of the size).
    ``gzip.decompress`` allocated about three times the text at once, zlib's blocks and then
    their join: 2.4 MB for 814 kB, at each snapshot's first scrape that did not take gzip."""
    return zlib.decompress(data, _GZIP_WBITS, int.from_bytes(data[-4:], "little"))


def _gzip(pieces: Sequence[str]) -> bytes:
    """The gzip of the text joined from ``pieces`` (no modification time: the bytes of
    ``gzip.compress(text, GZIP_LEVEL, mtime=0)``), compressed a few hundred pieces at a time.
    The text is never held whole: joined, its 856 kB at 10 M rows in the window were held
    twice (a string, then its bytes) at each rendering, and a served exporter reconciling at
    every refresh peaked at 101.2-101.4 MiB against 98.9-99.6 without."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    parts = [
        compressor.compress("".join(pieces[start : start + _PIECES]).encode("utf-8"))
        for start in range(0, len(pieces), _PIECES)
    ]
    parts.append(compressor.flush())
    return b"".join(parts)
