"""The metric catalog follows Prometheus naming conventions."""

from __future__ import annotations

import re

import pytest

from exporter import catalog as c


@pytest.mark.parametrize("metric", c.ALL_METRICS, ids=lambda m: m.name)
def test_names_follow_conventions(metric: c.MetricSpec) -> None:
    assert re.fullmatch(r"scidex_[a-z][a-z0-9_]*", metric.name)
    assert metric.name.endswith("_total") == (metric.kind == "counter")
    assert len(metric.help) > 20 and not metric.help[0].islower()
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", label) for label in metric.labels)
    assert len(set(metric.labels)) == len(metric.labels)


def test_names_are_unique() -> None:
    names = [m.name for m in c.ALL_METRICS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("metric", c.LEDGER_METRICS, ids=lambda m: m.name)
def test_ledger_units_are_in_the_name(metric: c.MetricSpec) -> None:
    name = metric.name.removesuffix("_total")
    if metric.unit == "currencyUSD":
        assert name.endswith("_usd")
    if "usd" in name.split("_"):
        assert metric.unit in ("currencyUSD", "none")


def test_family_names_and_lookup() -> None:
    assert c.SPEND.family == "scidex_spend_usd"
    assert c.BUILD_INFO.family == "scidex_exporter_build"
    assert c.PROVIDER_SPEND.family == c.PROVIDER_SPEND.name
    assert c.by_name("scidex_spend_usd_total") is c.SPEND
    assert c.by_name("scidex_spend_usd") is c.SPEND
    with pytest.raises(KeyError):
        c.by_name("scidex_nope")


def test_catalog_imports_without_heavy_dependencies() -> None:
    import subprocess
    import sys

    code = (
        "import sys, exporter.catalog; "
        "bad = {'psycopg', 'prometheus_client', 'apscheduler'} & set(sys.modules); "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
