"""Models, optional token columns and list prices, against rows a test inserted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from exporter.config import load_settings
from exporter.contract import check_relations
from exporter.models import model_name, model_ref
from exporter.refresh import Refresher
from tests.ledger import Call, insert, key, list_price, parse

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
S = "scidex_"
CATALOGUE = "genai-prices-" + __import__("genai_prices").__version__


@pytest.mark.parametrize(
    ("provider", "model", "name"),
    [
        ("bedrock/us.anthropic.claude-sonnet-4-20250514-v1:0", None, "claude-sonnet-4"),
        ("bedrock/eu.anthropic.claude-opus-4-v1:0", None, "claude-opus-4"),
        ("max/claude-opus-4", None, "claude-opus-4"),
        ("MAX/Claude-Opus-4", None, "claude-opus-4"),
        ("codex:gpt-5-codex", None, "gpt-5-codex"),
        ("MiniMax-M2", None, "minimax-m2"),
        ("glm-4.6", None, "glm-4.6"),
        ("openrouter/deepseek/deepseek-v3.1", None, "deepseek-v3.1"),
        ("x", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("x", "gpt-4o-2024-08-06", "gpt-4o"),
        ("x", "gemini-2.5-pro@20250601", "gemini-2.5-pro"),
        ("x", "us.anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4"),
        ("x", "  ", "x"),
        (None, None, None),
    ],
)
def test_model_label_is_normalised(provider: str | None, model: str | None, name: str) -> None:
    assert model_name(model_ref(provider, model)) == name


def _scrape(dsn: str, **settings: object) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    refresher = Refresher(load_settings({"dsn": dsn, **settings}, env={}))
    try:
        assert refresher.refresh(NOW), refresher.health.queries
        return parse(refresher.snapshot.text)
    finally:
        refresher.close()


def test_list_price_follows_the_catalogue_price_of_each_call_s_day(dsn: str) -> None:
    # gpt-5.6-luna's input price drops from $1 to $0.2 per million on 2026-07-30 (UTC).
    change = datetime(2026, 7, 30, tzinfo=UTC)
    calls = [
        Call(ts=change - timedelta(seconds=1), task_id="t1", provider="codex:gpt-5.6-luna"),
        Call(ts=change, task_id="t2", provider="codex:gpt-5.6-luna", cache_read_tokens=1000),
        Call(ts=change + timedelta(days=30), task_id="t3", provider="codex:gpt-5.6-luna"),
    ]
    insert(dsn, calls)
    got = _scrape(dsn)
    values = [list_price(c) for c in calls]
    assert values[0] != values[2]  # the two periods really differ
    want = float(sum(v for v in values if v is not None))
    series = key(
        S + "list_price_usd_total",
        quest="q-a",
        layer="Forge",
        provider="codex",
        catalogue=CATALOGUE,
    )
    assert got[series] == pytest.approx(want, rel=1e-12)
    model = key(
        S + "model_list_price_usd_total",
        provider="codex",
        model="gpt-5.6-luna",
        catalogue=CATALOGUE,
    )
    assert got[model] == got[series]


def test_unpriced_models_are_counted_and_a_price_setting_prices_them(dsn: str) -> None:
    calls = [
        Call(ts=NOW - timedelta(hours=1), task_id="t1", provider="local/llama-3.1-70b"),
        Call(ts=NOW - timedelta(hours=2), task_id="t2", provider="local/llama-3.1-70b"),
    ]
    insert(dsn, calls)
    got = _scrape(dsn)
    assert got[key(S + "unpriced_calls_total", provider="other", model="llama-3.1-70b")] == 2
    tokens = key(
        S + "unpriced_tokens_total", provider="other", model="llama-3.1-70b", direction="input"
    )
    assert got[tokens] == 200
    assert not any(k[0] == S + "list_price_usd_total" for k in got)

    price = {"model": "llama-3.1-70b", "input_usd_per_mtok": 1, "output_usd_per_mtok": 3}
    priced = _scrape(dsn, prices=[price])
    (listed,) = [k for k in priced if k[0] == S + "list_price_usd_total"]
    catalogue = dict(listed[1])["catalogue"]
    # A change of prices is a new series, never a rewrite of the old one.
    assert catalogue.startswith(CATALOGUE + "+") and catalogue != CATALOGUE
    assert priced[listed] == pytest.approx(2 * (100 * 1 + 50 * 3) / 1e6, rel=1e-12)
    assert not any(k[0] == S + "unpriced_calls_total" for k in priced)


def test_cache_and_reasoning_tokens_are_their_own_directions(dsn: str) -> None:
    calls = [
        Call(
            ts=NOW - timedelta(hours=1),
            task_id="t1",
            cache_read_tokens=700,
            cache_write_tokens=30,
            reasoning_tokens=20,
        ),
        Call(ts=NOW - timedelta(hours=1), task_id="t1", cache_read_tokens=-1),
        Call(ts=NOW - timedelta(hours=1), task_id="t1", reasoning_tokens=-5),
    ]
    insert(dsn, calls)
    got = _scrape(dsn)
    labels = {"quest": "q-a", "layer": "Forge", "provider": "bedrock"}
    tokens = {d: got[key(S + "tokens_total", direction=d, **labels)] for d in ("input", "output")}
    assert tokens == {"input": 100, "output": 50}
    assert got[key(S + "tokens_total", direction="cache_read", **labels)] == 700
    assert got[key(S + "tokens_total", direction="cache_write", **labels)] == 30
    assert got[key(S + "reasoning_tokens_total", **labels)] == 20
    excluded = key(S + "ledger_excluded_rows", relation="cost_ledger", reason="invalid_tokens")
    assert got[excluded] == 2
    # The window's tokens stay fresh input + output.
    assert got[key(S + "provider_tokens", provider="bedrock")] == 150


def test_a_ledger_without_the_optional_columns_works_and_check_says_so(dsn: str) -> None:
    insert(dsn, [Call(ts=NOW - timedelta(hours=1), task_id="t1", cache_read_tokens=5)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for column in ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
            conn.execute(f"ALTER TABLE cost_ledger DROP COLUMN {column}")
        notes: list[str] = []
        assert check_relations(conn, notes) == []
        assert len(notes) == 3 and all("optional column not found" in n for n in notes)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh(NOW)
        labels = {"quest": "q-a", "layer": "Forge", "provider": "bedrock"}
        cache_read = key(S + "tokens_total", direction="cache_read", **labels)
        assert parse(refresher.snapshot.text)[cache_read] == 0
        # The column comes back (a view redefined): the running sums are recomputed with it.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE cost_ledger ADD COLUMN cache_read_tokens bigint")
            conn.execute("UPDATE cost_ledger SET cache_read_tokens = 9")
        assert refresher.refresh(NOW + timedelta(seconds=30))
        assert parse(refresher.snapshot.text)[cache_read] == 9
    finally:
        refresher.close()


def test_models_beyond_max_models_fold_into_other(dsn: str) -> None:
    recent = NOW - timedelta(hours=1)
    calls = [
        # The most spend; the most tokens (a subscription call costs $0); neither.
        Call(
            ts=recent, task_id="t1", provider="bedrock/x", model="big-spender", cost_usd=Decimal(9)
        ),
        Call(ts=recent, task_id="t2", provider="max/opus", cost_usd=Decimal(0), input_tokens=10**6),
        Call(ts=recent, task_id="t3", provider="glm-4.6", cost_usd=Decimal(1)),
    ]
    insert(dsn, calls)
    got = _scrape(dsn, max_models=1)
    models = {dict(k[1])["model"] for k in got if k[0] == S + "model_calls_total"}
    assert models == {"big-spender", "opus", "other"}
    assert got[key(S + "model_calls_total", provider="glm", model="other")] == 1
    assert got[key("scidex_exporter_folded_label_values", label="model")] == 1


def test_price_periods_keep_the_full_scan_a_hash_aggregate(dsn: str) -> None:
    """Grouping by an expression of ts makes the planner expect a group per row and sort."""
    start = datetime(2026, 7, 1, tzinfo=UTC)
    providers = ("codex:gpt-5.6-luna", "max/claude-opus-4", "glm-4.6")
    calls = [
        Call(ts=start + timedelta(minutes=7 * i), task_id=f"t{i % 50}", provider=providers[i % 3])
        for i in range(20000)
    ]
    insert(dsn, calls)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh(NOW)
        from exporter.sources import Instants, SpendSource

        # The luna model changes price on a date inside the ledger: the sums are split there.
        assert len(refresher.source(SpendSource).prices.split) >= 1
        sql, params = refresher.statement("spend_totals", Instants.at(NOW, refresher.settings))
        params["after"] = None  # the full recomputation
        with psycopg.connect(dsn) as conn:
            conn.execute("ANALYZE cost_ledger")
            conn.execute("SET work_mem = '4MB'")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params).fetchall())
    finally:
        refresher.close()
    # The scan's aggregate (the statement's other parts read the largest id from an index).
    aggregate = next(line for line in plan.splitlines() if "Aggregate" in line)
    groups = int(aggregate.split("rows=", 1)[1].split(" ", 1)[0])  # its estimate
    assert groups <= len(calls) / 2, plan
    assert "HashAggregate" in aggregate and "Sort" not in plan, plan
