"""The generated dashboard: drift, Grafana's schema, lint rules, and PromQL against the catalog."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from dashboards import __main__ as generator
from dashboards import grafana, resource, rules, schema_check
from exporter import catalog
from tests.conftest import IN_CI, require_binary
from tests.promql import panel_queries, selectors

BOARD = grafana.render(resource.dashboard())
PANELS = [p for p in BOARD["panels"] if p["type"] != "row"]
COUNTERS = {m.name for m in catalog.ALL_METRICS if m.kind == "counter"}
METRICS = {m.name: m for m in (*catalog.ALL_METRICS, *rules.RECORDED_METRICS)}
DAILY = timedelta(days=1)


def test_committed_json_is_what_the_code_generates() -> None:
    for path, content in generator.generated().items():
        assert path.read_text(encoding="utf-8") == content, (
            f"{path.name} is out of date: run 'python -m dashboards'"
        )
    assert generator.main(["--check"]) == 0


def test_dashboard_identity_and_defaults() -> None:
    assert BOARD["uid"] == resource.UID and BOARD["title"] == "Resource Dashboard"
    assert BOARD["time"] == {"from": "now-30d", "to": "now"}
    assert BOARD["schemaVersion"] == grafana.SCHEMA_VERSION
    rows = [p["title"] for p in BOARD["panels"] if p["type"] == "row"]
    assert rows[:6] == [
        "Overview",
        "Budget allocation",
        "Utilization timeline",
        "Efficiency rankings",
        "Provider breakdown",
        "Wasted resources",
    ]


def test_variables_are_multi_select_with_all() -> None:
    variables = {v["name"]: v for v in BOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in grafana.FILTER_LABELS:
        v = variables[name]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
        (selector,) = selectors(v["query"]["query"].replace("label_values(", "").split(",")[0])
        assert name in catalog.by_name(selector.name).labels


# --- Grafana's own types ---------------------------------------------------------------------


def _tsc_or_skip() -> None:
    require_binary("node")
    try:
        schema_check.tsc_command()
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def test_dashboard_satisfies_grafana_schema_types() -> None:
    _tsc_or_skip()
    assert schema_check.check(BOARD, "resource") == []


def test_schema_check_catches_unknown_keys_and_wrong_types() -> None:
    _tsc_or_skip()
    broken = copy.deepcopy(BOARD)
    # One fault per panel: TypeScript reports one excess-property error per object literal.
    stats = [p for p in broken["panels"] if p["type"] == "stat"]
    table = next(p for p in broken["panels"] if p["type"] == "table")
    stats[0]["unknownPanelKey"] = 1
    stats[1]["options"]["colorMode"] = "rainbow"
    stats[2]["gridPos"]["h"] = "4"
    table["options"]["legacyStyles"] = []
    broken["templating"]["list"][1]["useTags"] = False
    errors = "\n".join(schema_check.check(broken, "broken_parts"))
    assert "'\"unknownPanelKey\"' does not exist" in errors
    assert "'\"rainbow\"' is not assignable" in errors
    assert "Type 'string' is not assignable to type 'number'" in errors
    assert "'\"legacyStyles\"' does not exist" in errors
    assert "'\"useTags\"' does not exist" in errors
    # An error inside a part hides the dashboard's own excess keys, so those get a run alone.
    broken = copy.deepcopy(BOARD)
    broken["rows"] = []
    errors = "\n".join(schema_check.check(broken, "broken_dashboard"))
    assert "'\"rows\"' does not exist" in errors


# --- Lint rules in the spirit of Grafana's dashboard-linter ------------------------------------


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_panel_has_title_description_unit_and_datasource_object(panel: dict[str, Any]) -> None:
    assert panel["title"] and len(panel["description"]) > 20
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for t in panel["targets"]:
        assert t["datasource"] == panel["datasource"]
        assert t["expr"] and t["refId"]


def test_no_legacy_keys_or_nulls_outside_threshold_bases() -> None:
    text = json.dumps(BOARD)
    for legacy in (
        '"span"',
        '"rows"',
        '"fieldOptions"',
        '"steps": ""',
        '"height"',
        '"minSpan"',
        '"__inputs"',
        '"hideControls"',
    ):
        assert legacy not in text

    def nulls(node: Any, path: str) -> list[str]:
        if isinstance(node, dict):
            return [n for k, v in node.items() for n in nulls(v, f"{path}.{k}")]
        if isinstance(node, list):
            return [n for i, v in enumerate(node) for n in nulls(v, f"{path}[{i}]")]
        return [path] if node is None else []

    allowed = {"id"}  # the dashboard id is null until Grafana stores it
    bad = [p for p in nulls(BOARD, "") if not p.endswith("[0].value") and p[1:] not in allowed]
    assert bad == []


def test_panel_ids_unique_and_grid_positions_do_not_overlap() -> None:
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in BOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= grafana.GRID_WIDTH
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize(
    ("panel", "target"), list(panel_queries(BOARD)), ids=lambda x: x.get("title", x.get("refId"))
)
def test_queries_use_catalog_metrics_with_filters_and_correct_counters(
    panel: dict[str, Any], target: dict[str, Any]
) -> None:
    for s in selectors(target["expr"]):
        if s.name == resource.ALERTS:
            assert set(s.matchers) == {"alertname"}
            continue
        metric = METRICS[s.name]  # KeyError: a metric neither exported nor recorded
        assert set(s.matchers) <= set(metric.labels), s
        for label in grafana.FILTER_LABELS:
            if label in metric.labels:
                assert s.matchers.get(label) == ("Re", f"${label}"), (
                    f"{panel['title']}: {s.name} ignores ${label}"
                )
        if s.name in COUNTERS:
            assert s.function in ("rate", "increase", "irate"), (
                f"{panel['title']}: counter {s.name} used without rate/increase"
            )
        if s.range is not None:
            assert s.range == DAILY or s.range == timedelta(seconds=59), (
                f"{panel['title']}: use $__rate_interval or a daily window, not {s.range}"
            )
