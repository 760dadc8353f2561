"""Recording rules and alerts: promtool-clean, unit-tested, and consistent with the catalog."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import __main__ as generator
from dashboards import rules
from dashboards.config import DASHBOARD_UID, DEFAULT
from exporter import catalog
from tests.conftest import require_binary
from tests.promql import selectors

ROOT = Path(__file__).resolve().parent.parent
RULE_TESTS = sorted((Path(__file__).parent / "rules").glob("*.yaml"))
GROUPS = rules.rule_groups()["groups"]
ALERTS = [r for g in GROUPS for r in g["rules"] if "alert" in r]
RECORDS = [r for g in GROUPS for r in g["rules"] if "record" in r]
KNOWN = {m.name for m in catalog.ALL_METRICS} | rules.RECORDED | {"up"}


def test_committed_rules_are_generated_and_promtool_clean() -> None:
    text = generator.generated()[generator.RULES]
    assert generator.RULES.read_text(encoding="utf-8") == text
    check = subprocess.run(
        [require_binary("promtool"), "check", "rules", str(generator.RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in check.stdout


def test_every_alert_is_in_exactly_one_group_after_what_it_reads() -> None:
    assert sorted(map(str, ALERTS)) == sorted(map(str, rules.alerts()))
    for group in GROUPS:
        recorded_here: set[str] = set()
        for rule in group["rules"]:
            if "record" in rule:
                recorded_here.add(rule["record"])
                continue
            read = {s.name for s in selectors(rule["expr"])} & rules.RECORDED
            assert read <= recorded_here, f"{rule['alert']} reads {read - recorded_here}"


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def _evaluations() -> list[dict[str, Any]]:
    out = []
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            out += test.get("alert_rule_test", [])
    return out


@pytest.mark.parametrize("name", rules.ALERT_NAMES)
def test_every_alert_is_tested_silent_firing_and_resolved(name: str) -> None:
    states = [bool(e["exp_alerts"]) for e in _evaluations() if e["alertname"] == name]
    assert True in states, f"{name}: no test where it fires"
    assert states.count(False) >= 2, f"{name}: needs a silent case before and after firing"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: f"{a['alert']}-{a['labels']['severity']}")
def test_alert_has_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("critical", "warning")
    annotations = alert["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}
    # The dashboard, absolute, with the alert's quest or provider selected when it has one.
    link = annotations["dashboard_url"]
    assert link.startswith(f"{DEFAULT.mixin.grafana_url}/d/{DASHBOARD_UID}")
    for label in ("quest", "provider"):
        if f"$labels.{label}" in annotations["summary"]:
            assert link.endswith(f"?var-{label}={{{{ $labels.{label} | urlquery }}}}")
    assert "{{ $value" in annotations["description"] or "{{ $labels" in annotations["description"]
    base, anchor = annotations["runbook_url"].split("#", 1)
    assert base == DEFAULT.mixin.runbook_url and base.startswith("https://")
    assert base.endswith("/docs/runbook.md")
    runbook = (ROOT / "docs" / "runbook.md").read_text(encoding="utf-8")
    assert re.search(rf"^## {alert['alert']}$", runbook, re.MULTILINE), anchor
    assert anchor == alert["alert"].lower()


@pytest.mark.parametrize("rule", RECORDS + ALERTS, ids=lambda r: r.get("record", r.get("alert")))
def test_rule_queries_use_known_metrics_and_the_job(rule: dict[str, Any]) -> None:
    for s in selectors(rule["expr"]):
        assert s.name in KNOWN, s.name
        if s.name in rules.RECORDED:
            continue
        assert s.matchers.get("job") == ("Equal", DEFAULT.mixin.job), s
        if s.name.endswith("_total"):
            assert s.function in ("rate", "increase"), s


@pytest.mark.parametrize("rule", RECORDS, ids=lambda r: r["record"])
def test_recording_rules_follow_level_metric_operation(rule: dict[str, Any]) -> None:
    level, metric, operation = rule["record"].split(":")
    assert level in ("quest", "provider")
    assert metric.startswith("scidex_") and operation
    assert rule["record"] in rules.RECORDED


HOSTILE = 'a"b\\c d&e'
"""The quest of tests/rules/names.yaml (and anomaly.yaml): a quote, a backslash, a space and an
ampersand."""


@pytest.mark.parametrize(
    "alert",
    [a for a in ALERTS if "$labels.quest" in a["annotations"]["summary"]],
    ids=lambda a: f"{a['alert']}-{a['labels']['severity']}",
)
def test_quest_alert_renders_for_any_quest_name(alert: dict[str, Any]) -> None:
    # promtool compares every annotation exactly: a template that cannot expand fails there.
    fired = [
        expected
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for evaluation in test["alert_rule_test"]
        if evaluation["alertname"] == alert["alert"]
        for expected in evaluation["exp_alerts"]
        if expected["exp_labels"].items() >= {**alert["labels"], "quest": HOSTILE}.items()
    ]
    assert fired, f"{alert['alert']} ({alert['labels']}) never fires for quest {HOSTILE!r}"
    assert HOSTILE in fired[0]["exp_annotations"]["description"]
