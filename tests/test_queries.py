"""The statements' shared parts that need no database."""

from __future__ import annotations

import pytest

from exporter.queries import Output


def test_a_statement_names_its_columns_and_the_rest_are_their_nulls_in_order() -> None:
    out = Output({"kind": "NULL::text", "task_id": "NULL", "total": "NULL::numeric"})
    sql = out.select(total="sum(c.cost)", kind="'sum'")
    assert [part.strip() for part in sql.split(",")] == [
        "'sum' AS kind",
        "NULL AS task_id",
        "sum(c.cost) AS total",
    ]
    assert out.by("total", "kind") == "3, 1"
    with pytest.raises(ValueError, match="'totl'"):
        out.select(totl="sum(c.cost)")
    with pytest.raises(ValueError, match="'totl'"):
        out.by("kind", "totl")
