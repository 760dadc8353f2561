"""The docs document every metric, setting and command the code defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.catalog import ALL_METRICS
from exporter.cli import build_parser
from exporter.config import FIELDS, env_var

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
METRICS = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [m.name for m in ALL_METRICS])
def test_every_metric_is_documented(name: str) -> None:
    assert f"| `{name}` |" in METRICS


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_is_documented(field: str) -> None:
    assert f"| `{field}` |" in CONFIGURATION
    assert env_var(field) in CONFIGURATION


def test_documented_metrics_exist() -> None:
    documented = set(re.findall(r"^\| `(scidex_[a-z0-9_]+)` \|", METRICS, re.MULTILINE))
    assert documented == {m.name for m in ALL_METRICS}


def test_quick_start_is_two_commands_that_the_makefile_has() -> None:
    quick = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (Path(__file__).parent.parent / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def test_every_command_is_documented() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        assert f"resource-exporter {command}" in README


def test_readme_is_short_and_its_links_resolve() -> None:
    assert len(README.splitlines()) <= 300
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (doc.parent / target).exists(), (doc.name, target)
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target
