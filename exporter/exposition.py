"""The text exposition format, byte for byte as prometheus-client renders it, at the cost of
what changed since the last rendering; and OpenMetrics from the same lines.

Most of prometheus-client's ``generate_latest`` time goes to escaping and joining each series'
labels, and between two refreshes few series change: of thousands, those with new rows. So a
family whose samples are all as they were keeps its lines, and in one that changed, a series
keeps its line if its value is the same, or the text before the value if only that changed
(families are sorted by label values, so a series is compared with the one at its place last
time). A line or header met for the first time is rendered by prometheus-client itself, so
escaping and formatting stay the library's; a family with samples this does not cover
(timestamps, OpenMetrics-only samples, other types) is rendered by the library whole.

OpenMetrics, what Prometheus asks for, writes a counter, gauge or info sample's line as the
text format does; only the family's header differs, and the ``# EOF`` at the end. So it is
made from the text rendering's lines and the library's header of each family, and a family
whose lines the formats would write differently (a sample name the format escapes, an
exemplar) is rendered by the library whole. At 1 M rows in the window (8,300 lines) the
library took 67 ms of the server's thread for the first scrape after each refresh, blocking
every other; made from the lines, 0.7 to 2.1 ms (docs/performance.md).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any, NamedTuple

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# The one sample name each family type renders as itself, after its header.
_SAMPLE_SUFFIX = {"counter": "_total", "gauge": "", "info": "_info"}


class Families:
    """The minimal collector interface prometheus-client's renderers ask for."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Family]:
        return iter(self._families)


class Rendering(NamedTuple):
    """A rendering's text, as the pieces it is joined from (each family's head and lines, held
    by the renderer already: the snapshot compresses them without joining them), and each
    family's sample lines in it (None: the library wrote the family whole), which OpenMetrics
    reuses."""

    pieces: list[str]
    lines: tuple[list[str] | None, ...]


class TextRenderer:
    """Renders families as ``generate_latest`` does, reusing the last rendering's text: a
    family whose samples are all as they were, or else the lines of its unchanged series."""

    def __init__(self) -> None:
        self._families: dict[str, _Rendered] = {}  # only the last rendering's families

    def render(self, families: Sequence[Family]) -> Rendering:
        last = self._families
        kept: dict[str, _Rendered] = {}
        out = []
        lines: list[list[str] | None] = []
        for fam in families:
            samples = fam.samples
            # Equal samples (compared in C) render the same text, but for the sign of a zero
            # (-0.0 == 0.0): the values' bytes tell those apart.
            values = _bytes(samples)
            before = last.get(fam.name)
            if before is not None and before.values == values and before.samples == samples:
                rendered = before
            else:
                rendered = self._rendered(fam, values, before)
            if values is not None:
                kept[fam.name] = rendered
            out.append(rendered.head)
            out += rendered.lines
            # A family the library wrote has no samples kept (an empty one: no lines either).
            lines.append(rendered.lines if rendered.samples else None)
        self._families = kept
        return Rendering(out, tuple(lines))

    def _rendered(self, fam: Family, values: bytes | None, before: _Rendered | None) -> _Rendered:
        suffix = _SAMPLE_SUFFIX.get(fam.type)
        samples = fam.samples
        if suffix is None:
            return _library_rendered(fam)
        name = fam.name + suffix
        # Families are built sorted by label values: a series is mostly where it was last time.
        last = before.samples if before is not None else []
        last_lines = before.lines if before is not None else []
        moved: dict[Any, str] | None = None  # label pairs -> last line, if a series moved
        lines = []
        for i, s in enumerate(samples):
            if s.name != name or s.timestamp is not None:
                return _library_rendered(fam)
            p = last[i] if i < len(last) else None
            if p is s:  # the very sample (exporter/families.py reuses an unchanged one)
                lines.append(last_lines[i])
                continue
            value = s.value
            if p is not None and p.labels == s.labels:
                line = last_lines[i]
                # The same text, unless NaN (never equal) or a zero (-0.0 reads "-0.0").
                if p.value == value and value != 0:
                    lines.append(line)
                    continue
                prefix = _up_to_value(line)
            else:
                if moved is None:
                    pairs = zip(last, last_lines, strict=True)
                    moved = {tuple(q.labels.items()): line for q, line in pairs}
                found = moved.get(tuple(s.labels.items()))
                prefix = _prefix(fam, s) if found is None else _up_to_value(found)
            lines.append(f"{prefix}{floatToGoString(value)}\n")  # type: ignore[no-untyped-call]
        return _Rendered(samples, values, _header(fam.name, fam.type, fam.documentation), lines)


class _Rendered(NamedTuple):
    """A family's samples as rendered last and the text they rendered to: its head (HELP and
    TYPE, or the whole text of a family the library renders) and each sample's line. The
    family's text is not kept joined too (0.8 MiB at 10 M rows in the window; the peak RSS
    115.1 and 115.6 MiB with it, 113.8 and 113.6 without), nor a line's text up to its value
    (``_up_to_value``)."""

    samples: list[Sample]
    values: bytes | None
    head: str
    lines: list[str]


def openmetrics(
    families: Sequence[Family], lines: Sequence[list[str] | None] | None = None
) -> list[str]:
    """The OpenMetrics exposition of ``families`` as prometheus-client writes it, as the
    pieces it is joined from (as ``Rendering.pieces``), made from their text rendering's sample
    ``lines`` (``Rendering.lines``; None: no rendering, every family by the library) wherever
    the two formats write the same line."""
    out = []
    for fam, fam_lines in zip(families, lines or [None] * len(families), strict=True):
        if fam_lines is not None and _same_lines(fam.name, fam.type) and not _exemplars(fam):
            out.append(_openmetrics_header(fam.name, fam.type, fam.documentation, fam.unit))
            out += fam_lines
        else:
            out.append(_openmetrics_library(fam))
    out.append("# EOF\n")
    return out


def _exemplars(fam: Family) -> bool:
    """Whether a sample has what only OpenMetrics writes (an exemplar, a native histogram)."""
    return any(s.exemplar is not None or s.native_histogram is not None for s in fam.samples)


@lru_cache(maxsize=1024)
def _same_lines(name: str, type: str) -> bool:
    """Whether both formats write the same line for a sample of this family (they escape a
    sample's name differently: OpenMetrics turns a colon into an underscore)."""
    fam = Family(name, "", type)
    fam.samples = [Sample(name + _SAMPLE_SUFFIX[type], {"a": "b"}, 0.0)]
    text = generate_latest(Families([fam])).decode("utf-8")
    return text.splitlines()[-1] == _openmetrics_library(fam).splitlines()[-1]


@lru_cache(maxsize=1024)
def _header(name: str, type: str, documentation: str) -> str:
    """A family's HELP and TYPE in the text format, as the library writes them."""
    return _library(Family(name, documentation, type))


@lru_cache(maxsize=1024)
def _openmetrics_header(name: str, type: str, documentation: str, unit: str) -> str:
    """A family's HELP, TYPE (and UNIT) in OpenMetrics, as the library writes them."""
    return _openmetrics_library(Family(name, documentation, type, unit))


def _openmetrics_library(fam: Family) -> str:
    """The library's OpenMetrics for one family, without the exposition's ``# EOF``."""
    text = bytes(generate_openmetrics(Families([fam])))  # type: ignore[no-untyped-call]
    return text.decode("utf-8").removesuffix("# EOF\n")


def _bytes(samples: list[Sample]) -> bytes | None:
    """The samples' values as doubles (None: a value that is no number)."""
    try:
        return array("d", map(_VALUE, samples)).tobytes()
    except TypeError:
        return None


_VALUE = attrgetter("value")


def _library_rendered(fam: Family) -> _Rendered:
    """A family the library renders whole, every time (no samples kept to compare)."""
    return _Rendered([], None, _library(fam), [])


def _library(fam: Family) -> str:
    return generate_latest(Families([fam])).decode("utf-8")


def _prefix(fam: Family, s: Sample) -> str:
    """The library's line for this series, up to its value."""
    alone = Family(fam.name, fam.documentation, fam.type)
    alone.samples = [Sample(s.name, s.labels, 0.0)]
    return _up_to_value(_library(alone).rstrip("\n").rsplit("\n", 1)[-1])


def _up_to_value(line: str) -> str:
    """A sample's line up to its value, which follows the last space (a value has none; a
    label value may). Not kept beside the lines: the 8,200 of 10 M rows in the window were 1.1
    MiB, and the peak RSS 117.1 MiB against 115.1 and 115.5 without them."""
    return line[: line.rindex(" ") + 1]
