"""The generated dashboard: drift, Grafana's schema, lint rules, and PromQL against the catalog."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import __main__ as generator
from dashboards import grafana, resource, rules, schema_check
from dashboards.config import DASHBOARD_UID
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
    assert BOARD["uid"] == DASHBOARD_UID and BOARD["title"] == "Resource Dashboard"
    assert BOARD["time"] == {"from": "now-30d", "to": "now"}
    assert BOARD["schemaVersion"] == grafana.SCHEMA_VERSION
    rows = [p["title"] for p in BOARD["panels"] if p["type"] == "row"]
    assert rows[:7] == [
        "Overview",
        "Budget allocation",
        "Utilization timeline",
        "Efficiency rankings",
        "Provider breakdown",
        "Models and prompt cache",
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


def test_every_panel_has_its_own_stable_id() -> None:
    ids = [p["id"] for p in BOARD["panels"]]
    assert sorted(ids) == sorted(resource.P), "each id of resource.P is used once"


def test_a_settings_file_reshapes_titles_descriptions_ranges_and_rules(tmp_path: Path) -> None:
    config = tmp_path / "exporter.yml"
    config.write_text(
        "window_days: 7\ngrace_hours: 2\nwaste_min_tokens: 5000\ntop_efficiency_tasks: 9\n"
        "mixin:\n  job: scidex-resources\n  fast_burn: 12\n  waste_share: 0.4\n"
        "  runbook_url: https://runbooks.example.org/ri/docs/runbook.md\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert generator.main(["--config", str(config), "--out", str(out)]) == 0
    board = json.loads((out / generator.DASHBOARD.name).read_text(encoding="utf-8"))
    rule_text = (out / generator.RULES.name).read_text(encoding="utf-8")
    texts = [p.get("title", "") + " " + p.get("description", "") for p in board["panels"]]
    for text in texts:
        for default in ("30 days", "30-day", "30d", "6 h", "1000 tokens"):
            assert default not in text, (default, text)
    for default in ("30 days", "30-day", "1000 tokens"):  # "6 hours" there is a burn window
        assert default not in rule_text, default
    titles = {p["id"]: p["title"] for p in board["panels"]}
    assert titles[resource.P.WINDOW_SPEND] == "Spend, 7 days"
    assert board["time"] == {"from": "now-7d", "to": "now"}
    waste = next(p for p in board["panels"] if p["id"] == resource.P.WASTED)
    assert "> 5000 tokens" in waste["description"] and "idle for over 2 h" in waste["description"]
    top = next(p for p in board["panels"] if p["id"] == resource.P.TOP_TASKS)
    assert "top 9" in top["description"]
    rules_file = yaml.safe_load(rule_text)
    alerts = [r for g in rules_file["groups"] for r in g["rules"] if "alert" in r]
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url == f"https://runbooks.example.org/ri/docs/runbook.md#{alert['alert'].lower()}"
    exprs = " ".join(r["expr"] for g in rules_file["groups"] for r in g["rules"])
    assert 'job="scidex-resources"' in exprs and 'job="resource-exporter"' not in exprs
    assert "> 12 and" in exprs and "> 0.4 and" in exprs
    waste_alert = next(a for a in alerts if a["alert"] == "WasteShareHigh")
    assert "last 7 days' spend" in waste_alert["annotations"]["description"]
    assert "over 5000 tokens" in waste_alert["annotations"]["description"]
    # The committed files are untouched, and still what the defaults generate.
    assert generator.main(["--check"]) == 0


def test_a_bad_settings_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "exporter.yml"
    config.write_text("mixin:\n  runbook_url: docs/runbook.md\n", encoding="utf-8")
    assert generator.main(["--config", str(config), "--out", str(tmp_path)]) == 2
    assert "setting 'mixin.runbook_url'" in capsys.readouterr().err


def test_the_grid_has_no_holes_and_no_overlaps() -> None:
    """Every cell of the 24-column grid, down to the last panel, belongs to exactly one panel."""
    cells: dict[tuple[int, int], list[int]] = {}
    for panel in BOARD["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                cells.setdefault((x, y), []).append(panel["id"])
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in BOARD["panels"])
    assert all(0 <= x < 24 for x, _ in cells)
    holes = [(x, y) for y in range(bottom) for x in range(24) if (x, y) not in cells]
    overlaps = {cell: ids for cell, ids in cells.items() if len(ids) > 1}
    assert not holes, f"empty cells (x, y): {holes[:10]}"
    assert not overlaps, f"cells covered twice: {list(overlaps.items())[:10]}"
