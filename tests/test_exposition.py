"""The exporter's renderer writes what prometheus-client's generate_latest writes, byte for
byte, however the series and their values change between renderings; and OpenMetrics made
from its lines what the library's OpenMetrics generate_latest writes."""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from datetime import UTC, datetime

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Exemplar

from exporter import generate
from exporter.catalog import MetricSpec
from exporter.config import load_settings
from exporter.exposition import Families, TextRenderer, openmetrics
from exporter.families import Samples, family_of
from exporter.refresh import Refresher

# Spaces too: the one before a value is the last of its line, whatever its labels hold.
LABEL_VALUES = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('\\"\n{}=, '),
    max_size=8,
)
VALUES = st.floats() | st.sampled_from([0.0, -0.0, math.inf, -math.inf, 1e21, 123456789.0])
LABELS: st.SearchStrategy[tuple[str, ...]] = st.tuples(LABEL_VALUES, LABEL_VALUES)
SERIES = st.dictionaries(LABELS, VALUES, max_size=6)


def _families(
    kinds: list[str], series: list[dict[tuple[str, ...], float]], samples: Samples | None
) -> list[Metric]:
    out: list[Metric] = []
    for i, (kind, values) in enumerate(zip(kinds, series, strict=True)):
        name, doc = f"scidex_test_{i}", 'help with \\ and\nnewline and "quotes"'
        if kind == "colon":  # a name OpenMetrics writes otherwise (the colon an underscore)
            name, kind = f"scidex:test_{i}", "counter"
        fam: Metric
        if kind == "exemplar":  # what only OpenMetrics writes
            fam = CounterMetricFamily(name, doc, labels=("quest",))
            for (quest, _), value in values.items():
                fam.add_metric([quest], abs(value), exemplar=Exemplar({"trace": quest}, 1.0))
            out.append(fam)
            continue
        if kind in ("counter", "gauge"):  # as the sources build them (samples: reused)
            sample_name = name + ("_total" if kind == "counter" else "")
            spec = MetricSpec(sample_name, kind, doc, ("quest", "layer"))  # type: ignore[arg-type]
            out.append(family_of(spec, values, samples))
            continue
        if kind == "info":
            fam = InfoMetricFamily(name, doc)
            for quest, layer in values:
                fam.add_metric([], {"quest": quest, "layer": layer})
            out.append(fam)
            continue
        else:  # a type the renderer leaves to the library whole
            fam = SummaryMetricFamily(name, doc, labels=("quest",))
            for (quest, _), value in values.items():
                fam.add_metric([quest], count_value=3, sum_value=value)
        out.append(fam)
    return out


def _joined(pieces: list[str]) -> bytes:
    """An exposition joined from its pieces, as a scrape reads it."""
    return "".join(pieces).encode("utf-8")


def _library_openmetrics(families: Sequence[Metric]) -> bytes:
    return bytes(generate_openmetrics(Families(families)))  # type: ignore[no-untyped-call]


def _bits(value: float) -> bytes:
    return struct.pack("d", value)  # tells -0.0 from 0.0


KINDS = st.lists(
    st.sampled_from(["counter", "gauge", "info", "summary", "colon", "exemplar"]),
    min_size=1,
    max_size=4,
)


def test_the_same_series_in_another_order_keep_the_label_order() -> None:
    spec = MetricSpec("scidex_test_order_total", "counter", "order", ("quest", "layer"))
    first: dict[tuple[str, ...], float] = {("b", "x"): 1.0, ("a", "y"): 2.0, ("a", "x"): 3.0}
    # The same series in another order, one value changed.
    again: dict[tuple[str, ...], float] = {("a", "y"): 2.0, ("b", "x"): 5.0, ("a", "x"): 3.0}
    for series in (first, again):
        fam = family_of(spec, series)
        got = [(s.labels["quest"], s.labels["layer"], s.value) for s in fam.samples]
        assert got == [("a", "x", 3.0), ("a", "y", 2.0), ("b", "x", series["b", "x"])]


@settings(max_examples=150, deadline=None)
@given(KINDS, st.data())
def test_every_rendering_equals_the_library(kinds: list[str], data: st.DataObject) -> None:
    # Unchanged samples reused (the ledger families) or built anew (the health families).
    renderer, samples = TextRenderer(), Samples() if data.draw(st.booleans()) else None
    series = [data.draw(SERIES) for _ in kinds]
    for _ in range(3):  # values change, series come and go, the renderer keeps its lines
        families = _families(kinds, series, samples)
        rendering = renderer.render(families)
        assert _joined(rendering.pieces) == generate_latest(Families(families))
        assert _joined(openmetrics(families, rendering.lines)) == _library_openmetrics(families)
        assert _joined(openmetrics(families)) == _library_openmetrics(families)  # no rendering
        for kind, fam, values in zip(kinds, families, series, strict=True):
            if kind in ("counter", "gauge"):  # each sample as given, whatever was reused
                got = {(s.labels["quest"], s.labels["layer"]): _bits(s.value) for s in fam.samples}
                assert got == {k: _bits(v) for k, v in values.items()}
                assert list(got) == sorted(values)  # in label order, however they came
        series = [
            {
                **{k: data.draw(VALUES) if data.draw(st.booleans()) else v for k, v in s.items()},
                **data.draw(SERIES),
            }
            for s in series
        ]


def test_a_refresh_renders_what_the_library_renders(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = generate.load(conn, 5_000)
    traffic = generate.LiveTraffic(plan)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        for _ in range(3):
            assert refresher.refresh()
            snapshot = refresher.snapshot
            assert snapshot.text == generate_latest(Families(snapshot.families))
            assert snapshot.lines is not None  # OpenMetrics made from the text's lines
            assert snapshot.openmetrics == _library_openmetrics(snapshot.families)
            assert b"scidex_spend_usd_total{" in snapshot.text
            with psycopg.connect(dsn, autocommit=True) as conn:
                cur = conn.cursor()
                with cur.copy(generate.COPY_COST) as copy:
                    for row in traffic.batch(datetime.now(UTC), calls=200):
                        copy.write_row(row)
    finally:
        refresher.close()


def test_once_a_scrape_asked_for_openmetrics_the_refresh_makes_it(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        generate.load(conn, 1_000)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        for _ in range(2):
            assert refresher.refresh()
            assert "openmetrics_gzip" not in vars(refresher.snapshot)  # nobody asked for it
        refresher.snapshot.body(openmetrics=True, compressed=True)  # Prometheus scrapes
        for _ in range(2):
            assert refresher.refresh()
            snapshot = refresher.snapshot
            assert "openmetrics_gzip" in vars(snapshot)  # made by the refresh, before a scrape
            expected = _library_openmetrics(snapshot.families)
            assert gzip.decompress(snapshot.body(openmetrics=True, compressed=True)) == expected
    finally:
        refresher.close()
