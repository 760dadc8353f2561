"""Walk the PromQL of generated artifacts with a real parser (promql-parser)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import promql_parser

RATE_INTERVAL = "$__rate_interval"
RATE_INTERVAL_STANDIN = timedelta(seconds=59)
"""``$__rate_interval`` is not PromQL; it is parsed as this otherwise unused duration."""


@dataclass(frozen=True)
class Selector:
    """A vector selector and what encloses it."""

    name: str
    matchers: dict[str, tuple[str, str]]  # label -> (op, value)
    range: timedelta | None  # the range when it sits in a matrix selector
    function: str | None  # the function a matrix selector is the argument of


def parse(expr: str) -> Any:
    """Parse a panel query; the dashboard's own variables are replaced by stand-ins."""
    return promql_parser.parse(expr.replace(RATE_INTERVAL, "59s").replace("$basis", "0"))


def selectors(expr: str) -> list[Selector]:
    """Return every vector selector of ``expr``."""
    return list(_walk(parse(expr), None))


def _walk(node: Any, function: str | None) -> Iterator[Selector]:
    kind = type(node).__name__
    if kind == "VectorSelector":
        yield _selector(node, None, None)
    elif kind == "MatrixSelector":
        yield _selector(node.vector_selector, node.range, function)
    elif kind == "Call":
        for arg in node.args:
            yield from _walk(arg, node.func.name)
    else:
        for attr in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                yield from _walk(child, None)


def _selector(vs: Any, rng: timedelta | None, function: str | None) -> Selector:
    matchers = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in vs.matchers.matchers}
    return Selector(vs.name, matchers, rng, function)


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (panel, target) for every query of every panel."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target
