"""Every ledger family against numbers computed independently from the inserted rows."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from exporter import catalog as c
from exporter import generate
from exporter.config import load_settings
from exporter.refresh import Refresher
from exporter.sources import KINDS
from exporter.sources.base import CHUNK_ROWS, Build
from tests.conftest import temporary_database
from tests.ledger import (
    FAMILY_OF,
    Budget,
    Call,
    Impact,
    Rules,
    expected,
    from_plan,
    insert,
    key,
    ledger_samples,
    parse,
    relax,
)

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
TODAY = NOW.date()
MIDNIGHT = datetime(2026, 11, 20, tzinfo=UTC)
D = Decimal


def ago(**kw: float) -> datetime:
    return NOW - timedelta(**kw)


def scrape(dsn: str, now: datetime = NOW, **settings: Any) -> dict[Any, float]:
    """Refresh once at ``now`` and parse the exposition a scrape would get."""
    refresher = Refresher(load_settings({"dsn": dsn, **settings}, env={}))
    try:
        assert refresher.refresh(now), refresher.health.queries
    finally:
        refresher.close()
    return parse(refresher.snapshot.text)


def assert_matches(got: dict[Any, float], want: dict[Any, float]) -> None:
    got = ledger_samples(got)
    assert set(got) - set(want) == set(), "unexpected series"
    assert set(want) - set(got) == set(), "missing series"
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k


# --- whole-ledger comparisons ----------------------------------------------------------------


@pytest.mark.parametrize("task_ids", generate.TASK_IDS)
def test_generated_ledger_matches_reference_model(dsn: str, task_ids: str) -> None:
    """Every family against the reference model, with the generator's short task ids and with
    UUIDs (which the exporter's task store packs)."""
    calls, impacts, budgets = from_plan(generate.plan(4000, seed=3, end=NOW, task_ids=task_ids))
    insert(dsn, calls, impacts, budgets)
    assert len(calls) == 4000
    assert all((len(c.task_id or "") == 36) == (task_ids == "uuid") for c in calls)
    assert {c.provider for c in calls} <= set(FAMILY_OF)
    want = expected(calls, impacts, budgets, NOW, TODAY, MIDNIGHT)
    assert any(k[0] == "scidex_task_wasted_tokens" for k in want)
    assert any(k[0] == "scidex_task_impact_per_usd" for k in want)
    # Subscription calls are worth their list price; some models have none.
    assert any(
        k[0] == "scidex_list_price_usd_total" and ("provider", "max") in k[1] and v > 0
        for k, v in want.items()
    )
    assert any(k[0] == "scidex_unpriced_calls_total" for k in want)
    # Under the list-price basis, subscription tasks are ranked and their waste is priced.
    by_list = {k[1] for k in want if k[0] == "scidex_task_impact_per_list_usd"}
    by_cost = {k[1] for k in want if k[0] == "scidex_task_impact_per_usd"}
    assert by_list - by_cost
    assert any(k[0] == "scidex_wasted_list_price_usd" and v > 0 for k, v in want.items())
    assert any(
        k[0] == "scidex_tokens_total" and ("direction", "cache_read") in k[1] and v > 0
        for k, v in want.items()
    )
    assert_matches(scrape(dsn), want)


@pytest.mark.parametrize("chunked", [True, False])
def test_large_reads_stream_in_chunks_or_row_by_row(
    dsn: str, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    """Large reads stream in chunks of one size, which libpq has from version 17 on (psycopg's
    binary package bundles one); with an older one they stream a row at a time, same numbers."""
    if chunked and not psycopg.capabilities.has_stream_chunked():
        pytest.skip("this psycopg's libpq has no chunked mode (psycopg-binary bundles one)")
    calls, impacts, budgets = from_plan(generate.plan(1500, seed=5, end=NOW))
    insert(dsn, calls, impacts, budgets)
    sizes: list[int] = []
    stream = psycopg.Cursor.stream

    def recorded(self: psycopg.Cursor[Any], *args: Any, size: int = 1, **kwargs: Any) -> Any:
        sizes.append(size)
        return stream(self, *args, size=size, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "stream", recorded)
    monkeypatch.setattr(psycopg.capabilities, "has_stream_chunked", lambda check=False: chunked)
    got = scrape(dsn)
    # the spend read and the window's rebuild at least
    assert len(sizes) >= 2 and set(sizes) == {CHUNK_ROWS if chunked else 1}
    assert_matches(got, expected(calls, impacts, budgets, NOW, TODAY, MIDNIGHT))


def test_hostile_rows_are_excluded_counted_and_valid_totals_exact(dsn: str) -> None:
    relax(dsn)
    calls = [
        Call(ago(hours=8), "t1", cost_usd=D("2.5"), input_tokens=2000, output_tokens=10),
        Call(ago(hours=8), "t1", cost_usd=D("NaN")),
        Call(ago(hours=8), "t1", cost_usd=D("-3")),
        Call(ago(hours=8), "t1", cost_usd=None),
        Call(ago(hours=8), "t1", cost_usd=D("Infinity")),
        Call(ago(hours=8), "t1", input_tokens=-5),
        Call(ago(hours=8), "t1", output_tokens=None),
        Call(None, "t1"),
        Call(
            ago(hours=9),
            "t2",
            quest='we"ird\\que\nst',
            layer="",
            provider=None,
            cost_usd=D("1e15"),
            input_tokens=2**62,
            output_tokens=2**62,
        ),
        Call(ago(hours=9), None, quest=None, cost_usd=D("0.25")),
        Call(ago(hours=9), "t3", quest="🚀 مرحبا" + "x" * 10_000, cost_usd=D("0")),
        Call(ago(hours=9), "t3", quest="🚀 مرحبا" + "x" * 10_000, cost_usd=D("0")),
        Call(ago(hours=10), "t4", quest="q\x01\x07\x1b-ctl", cost_usd=D("4")),
    ]
    impacts = [
        Impact("t1", float("nan")),
        Impact("t2", 0.3, measured_at=ago(hours=2)),
        Impact("t2", 9.0, measured_at=ago(hours=1)),  # the latest measurement wins
        Impact("t5-no-spend", 3.0),
    ]
    budgets = [
        Budget("q-a", TODAY, D("0")),
        Budget("q-b", TODAY, D("NaN")),
        Budget("q-c", TODAY, None),
        Budget("q-d", TODAY, D("-1")),
    ]
    insert(dsn, calls, impacts, budgets)
    got = scrape(dsn)
    assert_matches(got, expected(calls, impacts, budgets, NOW, TODAY, MIDNIGHT))
    excluded = {k[1]: v for k, v in got.items() if k[0] == "scidex_ledger_excluded_rows"}
    assert excluded[frozenset({("relation", "cost_ledger"), ("reason", "nan_cost")})] == 1
    assert (
        excluded[
            frozenset({("relation", "quest_budget_allocations"), ("reason", "invalid_allocation")})
        ]
        == 3
    )
    spend = sum(v for k, v in got.items() if k[0] == "scidex_spend_usd_total")
    assert spend == pytest.approx(2.5 + 1e15 + 0.25 + 4)
    assert got[key("scidex_budget_allocated_usd", quest="q-a")] == 0
    assert key("scidex_budget_utilization_ratio", quest="q-a") not in got
    assert got[key("scidex_exporter_cleaned_label_values", label="quest")] == 4


def test_rows_at_an_infinite_time_are_excluded_and_the_rest_exact(dsn: str) -> None:
    # PostgreSQL's timestamptz holds 'infinity' and '-infinity'; no day, window or epoch has
    # them. Python's datetime cannot: such rows are written here in SQL, and the reference
    # model is given the others.
    calls = [
        Call(ago(hours=2), "t1", cost_usd=D("1.5")),
        Call(ago(days=3), "t2", quest="q-b", cost_usd=D("2")),
    ]
    impacts = [Impact("t1", 2.0)]
    insert(dsn, calls, impacts, [])
    infinite = (
        "INSERT INTO cost_ledger (ts, task_id, quest, layer, provider, model, cost_usd,"
        " input_tokens, output_tokens) VALUES"
        " ('infinity', 't1', 'q-a', 'Forge', 'anthropic', 'm', 7, 10, 10),"
        " ('-infinity', 't3', 'q-a', 'Forge', 'anthropic', 'm', 9, 10, 10)"
    )
    want = expected(calls, impacts, [], NOW, TODAY, MIDNIGHT)
    reason = key("scidex_ledger_excluded_rows", relation="cost_ledger", reason="infinite_timestamp")
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        for _ in range(2):  # then the third, a steady one, reads them after the watermark
            assert refresher.refresh(NOW), refresher.health.queries
        with psycopg.connect(dsn) as conn:
            conn.execute(infinite)
        assert refresher.refresh(NOW), refresher.health.queries
    finally:
        refresher.close()
    assert_matches(parse(refresher.snapshot.text), want | {reason: 2})
    assert_matches(scrape(dsn), want | {reason: 2})  # and by a first refresh


# --- one rule at a time, with hand-computed numbers ------------------------------------------


def test_task_in_window_by_latest_row_with_cost_over_all_rows(dsn: str) -> None:
    insert(
        dsn,
        [
            Call(ago(days=40), "old-then-recent", cost_usd=D("3")),
            Call(ago(days=29), "old-then-recent", cost_usd=D("2")),
            Call(ago(days=31), "only-old", cost_usd=D("7")),
            Call(ago(days=31), "only-old", cost_usd=D("1"), provider="glm-4.6"),
        ],
    )
    got = scrape(dsn)
    assert got[key("scidex_provider_spend_usd", provider="bedrock")] == 5
    assert got[key("scidex_provider_tasks", provider="bedrock")] == 1
    assert got[key("scidex_provider_tokens", provider="bedrock")] == 300
    assert got[key("scidex_provider_avg_cost_per_task_usd", provider="bedrock")] == 5
    assert got[key("scidex_provider_spend_usd", provider="glm")] == 0
    assert key("scidex_provider_avg_cost_per_task_usd", provider="glm") not in got
    assert got[key("scidex_quest_window_spend_usd", quest="q-a")] == 5
    # The counters are cumulative over the whole ledger.
    assert got[key("scidex_spend_usd_total", quest="q-a", layer="Forge", provider="bedrock")] == 12
    assert got[key("scidex_spend_usd_total", quest="q-a", layer="Forge", provider="glm")] == 1


def test_a_relabelled_task_takes_its_latest_valid_rows_quest_and_layer(dsn: str) -> None:
    tie = ago(hours=3)
    calls = [
        # History before the window under other labels and another provider.
        Call(ago(days=45), "moved", quest="q-old", layer="Atlas", provider="glm-4.6"),
        Call(ago(days=2), "moved", quest="q-mid", layer="Agora"),
        Call(ago(hours=5), "moved", quest="q-new", layer="Senate", cost_usd=D("0.5")),
        # The latest row is invalid: the one before it labels the task.
        Call(ago(hours=1), "moved", quest="q-zzz", layer="Exchange", cost_usd=D("NaN")),
        # Two rows at the same instant: the later id wins, whatever the order of the names.
        Call(tie, "tied", quest="q-b", layer="Forge"),
        Call(tie, "tied", quest="q-a", layer="Atlas"),
        Call(ago(hours=2), "steady", quest="q-c", layer="Forge", cost_usd=D("2")),
        Call(ago(days=40), "steady", quest="q-c", layer="Forge", cost_usd=D("3")),
    ]
    insert(dsn, calls)
    got = scrape(dsn)
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT))
    # Independently of the model: "moved" spent 1 + 1 + 0.5 under q-new, "tied" 2 under q-a.
    assert got[key("scidex_quest_window_spend_usd", quest="q-new")] == 2.5
    assert got[key("scidex_quest_window_spend_usd", quest="q-a")] == 2
    assert got[key("scidex_quest_window_spend_usd", quest="q-c")] == 5
    assert got[key("scidex_provider_spend_usd", provider="glm")] == 1
    assert got[key("scidex_provider_tasks", provider="glm")] == 1
    assert got[key("scidex_provider_spend_usd", provider="bedrock")] == 1 + 0.5 + 2 + 2 + 3


def test_provider_tasks_count_each_task_once_per_family(dsn: str) -> None:
    insert(
        dsn,
        [
            Call(
                ago(hours=1), "t1", provider="bedrock/us.anthropic.claude-sonnet-4", cost_usd=D("1")
            ),
            Call(
                ago(hours=1), "t1", provider="bedrock/us.anthropic.claude-opus-4", cost_usd=D("2")
            ),
            Call(ago(hours=1), "t1", provider="MiniMax-M2", cost_usd=D("0.5")),
            Call(ago(hours=1), "t2", provider="max/claude-opus-4", cost_usd=D("0")),
            Call(ago(hours=1), "t3", provider="maximal-model", cost_usd=D("0.1")),
            Call(ago(hours=1), "t4", provider="some-new-vendor/x", cost_usd=D("0.2")),
        ],
    )
    got = scrape(dsn)
    tasks = {
        p: got[key("scidex_provider_tasks", provider=p)]
        for p in ("bedrock", "minimax", "max", "other", "codex", "glm")
    }
    assert tasks == {"bedrock": 1, "minimax": 1, "max": 1, "other": 2, "codex": 0, "glm": 0}
    assert got[key("scidex_provider_spend_usd", provider="bedrock")] == 3
    assert got[key("scidex_provider_avg_cost_per_task_usd", provider="max")] == 0
    assert got[key("scidex_provider_avg_cost_per_task_usd", provider="other")] == pytest.approx(
        0.15
    )


def test_waste_rules_tokens_impact_and_grace(dsn: str) -> None:
    big: dict[str, Any] = {"input_tokens": 900, "output_tokens": 200}  # 1100 tokens
    insert(
        dsn,
        [
            Call(ago(hours=7), "no-impact-row", cost_usd=D("1"), **big),
            Call(ago(hours=7), "null-score", cost_usd=D("2"), **big),
            Call(ago(hours=7), "score-at-threshold", cost_usd=D("3"), **big),
            Call(ago(hours=7), "score-above", cost_usd=D("4"), **big),
            Call(ago(hours=5), "still-running", cost_usd=D("5"), **big),
            Call(ago(hours=7), "exactly-1000", input_tokens=1000, output_tokens=0),
            Call(ago(days=31), "outside-window", cost_usd=D("6"), **big),
        ],
        [
            Impact("null-score", None),
            Impact("score-at-threshold", 0.5),
            Impact("score-above", 0.51),
        ],
    )
    got = scrape(dsn)
    wasted = {dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_wasted_usd"}
    assert wasted == {"no-impact-row": 1, "null-score": 2, "score-at-threshold": 3}
    assert got[key("scidex_wasted_usd", quest="q-a", layer="Forge")] == 6
    assert got[key("scidex_wasted_tokens", quest="q-a", layer="Forge")] == 3300
    assert got[key("scidex_wasted_tasks", quest="q-a", layer="Forge")] == 3


def test_waste_top_n_by_tokens_ties_by_task_id(dsn: str) -> None:
    calls = [
        Call(
            ago(hours=8),
            f"t{i:02d}",
            input_tokens=2000 + (i // 2) * 10,
            output_tokens=0,
            cost_usd=D("1"),
        )
        for i in range(24)
    ]
    insert(dsn, calls)
    got = scrape(dsn)
    top = {dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_wasted_tokens"}
    # 24 tasks, tokens rise by 10 every second task; the four smallest drop out.
    assert sorted(top) == [f"t{i:02d}" for i in range(4, 24)]
    assert top["t23"] == 2110
    assert got[key("scidex_wasted_tasks", quest="q-a", layer="Forge")] == 24


def test_efficiency_top_15_by_ratio_with_ties_by_task_id(dsn: str) -> None:
    calls, impacts = [], []
    for i in range(20):
        calls.append(Call(ago(hours=1), f"e{i:02d}", cost_usd=D("2")))
        impacts.append(Impact(f"e{i:02d}", float(i // 2 + 1)))  # ratios tie in pairs
    calls += [
        Call(ago(hours=1), "zero-cost", cost_usd=D("0")),
        Call(ago(hours=1), "negative-impact", cost_usd=D("1")),
        Call(ago(hours=1), "unmeasured", cost_usd=D("1")),
    ]
    impacts += [Impact("zero-cost", 100.0), Impact("negative-impact", -1.0)]
    insert(dsn, calls, impacts)
    got = scrape(dsn)
    ranked = {
        dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_impact_per_usd"
    }
    # e18/e19 ratio 5.0 ... e06/e07 ratio 2.0 fill 14 places; e04 and e05 tie at 1.5 for the
    # last one, and the smaller task_id wins it.
    assert sorted(ranked) == ["e04", *(f"e{i:02d}" for i in range(6, 20))]
    assert ranked["e19"] == 5.0 and ranked["e04"] == 1.5
    labels = {"task_id": "e19", "quest": "q-a", "layer": "Forge"}
    assert got[key("scidex_task_cost_usd", **labels)] == 2
    assert got[key("scidex_task_impact_score", **labels)] == 10
    # Quest impact per $: all measured impact over all window cost (unmeasured included).
    impact_sum = sum(i // 2 + 1 for i in range(20)) + 100 - 1
    assert got[key("scidex_quest_impact_per_usd", quest="q-a")] == pytest.approx(impact_sum / 42)


def test_quests_beyond_50_fold_into_other(dsn: str) -> None:
    # All new today: the first 50 to spend take the places, the later ones fold.
    calls = [
        Call(ago(hours=1), f"t{i}", quest=f"quest-{i:02d}", cost_usd=D(i + 1)) for i in range(55)
    ]
    insert(dsn, calls)
    got = scrape(dsn)
    quests = {dict(k[1])["quest"] for k in got if k[0] == "scidex_spend_usd_total"}
    assert len(quests) == 51 and "other" in quests
    assert {f"quest-{i:02d}" for i in range(50, 55)}.isdisjoint(quests)
    other = {"quest": "other", "layer": "Forge", "provider": "bedrock"}
    assert got[key("scidex_spend_usd_total", **other)] == 51 + 52 + 53 + 54 + 55
    assert got[key("scidex_quest_spend_today_usd", quest="other")] == 51 + 52 + 53 + 54 + 55
    assert got[key("scidex_exporter_folded_label_values", label="quest")] == 5
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT))
    got = scrape(dsn, max_quests=10)
    assert got[key("scidex_exporter_folded_label_values", label="quest")] == 45
    # Today's largest budgets keep their labels, for the budget and spend-today gauges.
    budgets = [Budget(f"quest-{i:02d}", TODAY, D(100 + i)) for i in range(55)]
    insert(dsn, [], budgets=budgets)
    got = scrape(dsn)
    assert got[key("scidex_budget_allocated_usd", quest="quest-54")] == 154
    assert got[key("scidex_quest_spend_today_usd", quest="quest-54")] == 55
    assert key("scidex_budget_allocated_usd", quest="other") not in got
    assert_matches(got, expected(calls, [], budgets, NOW, TODAY, MIDNIGHT))


def test_layers_and_models_are_weighed_by_exact_window_spend(dsn: str) -> None:
    # Zeta's window spend, 0.1 + 0.2, is 0.3 exactly: a tie with Atlas, which keeps the one
    # label by name. Summed as floats it was 0.30000000000000004, and Zeta took it; the same
    # for their models (and their tokens tie too).
    sonnet, opus = "bedrock/us.anthropic.claude-sonnet-4", "bedrock/us.anthropic.claude-opus-4"
    calls = [
        Call(ago(hours=3), "t1", quest="q-a", layer="Zeta", provider=sonnet, cost_usd=D("0.1")),
        Call(ago(hours=2), "t2", quest="q-b", layer="Zeta", provider=sonnet, cost_usd=D("0.2")),
        Call(
            ago(hours=1),
            "t3",
            quest="q-a",
            layer="Atlas",
            provider=opus,
            cost_usd=D("0.3"),
            input_tokens=200,
            output_tokens=100,
        ),
    ]
    insert(dsn, calls)
    got = scrape(dsn, max_layers=1, max_models=1)
    layers = {dict(k[1])["layer"] for k in got if k[0] == "scidex_spend_usd_total"}
    assert layers == {"Atlas", "other"}
    models = {dict(k[1])["model"] for k in got if k[0] == "scidex_model_spend_usd_total"}
    assert models == {"claude-opus-4", "other"}
    rules = Rules(max_layers=1, max_models=1)
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT, rules))


def test_models_are_weighed_by_window_tokens_cache_tokens_included(dsn: str) -> None:
    # Two subscription models at $0: sonnet with more input and output tokens (600 against
    # 200), opus with more tokens in all once its cache tokens count (650). One label by spend
    # (gpt-5-codex) and one by tokens: opus keeps it.
    calls = [
        Call(
            ago(hours=3),
            "t1",
            provider="codex:gpt-5-codex",
            cost_usd=D("1.5"),
            input_tokens=10,
            output_tokens=10,
        ),
        Call(
            ago(hours=2),
            "t2",
            provider="max/claude-sonnet-4",
            cost_usd=D(0),
            input_tokens=400,
            output_tokens=200,
        ),
        Call(
            ago(hours=1),
            "t3",
            provider="max/claude-opus-4",
            cost_usd=D(0),
            input_tokens=100,
            output_tokens=100,
            cache_read_tokens=400,
            cache_write_tokens=50,
        ),
    ]
    insert(dsn, calls)
    got = scrape(dsn, max_models=1)
    models = {dict(k[1])["model"] for k in got if k[0] == "scidex_model_spend_usd_total"}
    assert models == {"gpt-5-codex", "claude-opus-4", "other"}
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT, Rules(max_models=1)))


def test_a_quest_with_a_large_budget_keeps_its_label_spent_or_not(dsn: str) -> None:
    # max_quests 2: the two largest spenders, and the two largest allocations today.
    calls = [
        Call(ago(hours=1), "t1", quest="spends-most", cost_usd=D(10)),
        Call(ago(hours=1), "t2", quest="spends-more", cost_usd=D(5)),
        Call(ago(hours=1), "t3", quest="spends-little", cost_usd=D(1)),
        Call(ago(hours=1), "t4", quest="small-budget", cost_usd=D("0.5")),
    ]
    budgets = [
        Budget("new-quest", TODAY, D(1000)),  # no spend yet
        Budget("stalled", TODAY, D(500)),
        Budget("small-budget", TODAY, D(1)),
        Budget("spends-little", TODAY, D(0)),  # a zero allocation keeps nothing
    ]
    insert(dsn, calls, budgets=budgets)
    got = scrape(dsn, max_quests=2)
    for quest in ("new-quest", "stalled"):
        assert got[key("scidex_quest_spend_today_usd", quest=quest)] == 0
        assert got[key("scidex_budget_utilization_ratio", quest=quest)] == 0
    assert got[key("scidex_budget_allocated_usd", quest="new-quest")] == 1000
    assert got[key("scidex_budget_allocated_usd", quest="other")] == 1
    assert got[key("scidex_quest_spend_today_usd", quest="other")] == 1.5
    spenders = {dict(k[1])["quest"] for k in got if k[0] == "scidex_spend_usd_total"}
    assert spenders == {"spends-most", "spends-more", "other"}
    assert got[key("scidex_exporter_folded_label_values", label="quest")] == 2
    assert_matches(got, expected(calls, [], budgets, NOW, TODAY, MIDNIGHT, Rules(max_quests=2)))


def test_today_follows_the_configured_timezone(dsn: str) -> None:
    # 15:00 UTC on Nov 20 is already Nov 21 in Tokyo (00:00 there = 15:00 UTC on Nov 20).
    insert(
        dsn,
        [
            Call(ago(hours=1), "t1", cost_usd=D("3")),  # 14:00 UTC
            Call(ago(minutes=30) + timedelta(minutes=45), "t1", cost_usd=D("4")),
        ],
        budgets=[
            Budget("q-a", date(2026, 11, 20), D("10")),
            Budget("q-a", date(2026, 11, 21), D("8")),
        ],
    )
    utc = scrape(dsn)
    assert utc[key("scidex_quest_spend_today_usd", quest="q-a")] == 7
    assert utc[key("scidex_budget_utilization_ratio", quest="q-a")] == pytest.approx(0.7)
    tokyo = scrape(dsn, now=NOW + timedelta(minutes=20), timezone="Asia/Tokyo")
    assert tokyo[key("scidex_quest_spend_today_usd", quest="q-a")] == 4
    assert tokyo[key("scidex_budget_allocated_usd", quest="q-a")] == 8
    assert tokyo[key("scidex_budget_utilization_ratio", quest="q-a")] == pytest.approx(0.5)


def test_month_to_date_and_month_budgets_follow_the_configured_timezone(dsn: str) -> None:
    # 16:00 UTC on Nov 30 is 01:00 on Dec 1 in Tokyo: the same rows make two different months.
    now = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    calls = [
        Call(datetime(2026, 10, 31, 23, 0, tzinfo=UTC), "t1", cost_usd=D("1")),  # Nov 1 in Tokyo
        Call(datetime(2026, 11, 1, 0, 0, tzinfo=UTC), "t1", cost_usd=D("2")),  # the 1st, 00:00
        Call(datetime(2026, 11, 15, 12, 0, tzinfo=UTC), "t2", cost_usd=D("4")),
        Call(datetime(2026, 11, 30, 15, 30, tzinfo=UTC), "t3", cost_usd=D("8")),  # Dec 1, Tokyo
    ]
    budgets = [
        Budget("q-a", date(2026, 10, 31), D("100")),
        Budget("q-a", date(2026, 11, 1), D("10")),
        Budget("q-a", date(2026, 11, 15), D("20")),
        Budget("q-a", date(2026, 11, 20), None),  # invalid: counted, in no sum
        Budget("q-a", date(2026, 11, 30), D("40")),
        Budget("q-a", date(2026, 12, 1), D("80")),
        Budget("q-a", date(2026, 12, 2), D("160")),  # planned ahead
        Budget("q-a", date(2026, 12, 31), D("NaN")),
        Budget("q-a", date(2027, 1, 1), D("1000")),
        Budget("q-b", date(2026, 12, 5), D("5")),  # a budget, no spend yet
    ]
    insert(dsn, calls, budgets=budgets)
    excluded = key(
        "scidex_ledger_excluded_rows",
        relation="quest_budget_allocations",
        reason="invalid_allocation",
    )

    utc = scrape(dsn, now=now)
    assert utc[key("scidex_quest_spend_month_usd", quest="q-a")] == 2 + 4 + 8
    assert utc[key("scidex_budget_allocated_usd", quest="q-a")] == 40
    assert utc[key("scidex_budget_allocated_month_to_date_usd", quest="q-a")] == 10 + 20 + 40
    assert utc[key("scidex_budget_allocated_month_usd", quest="q-a")] == 10 + 20 + 40
    assert key("scidex_budget_allocated_month_usd", quest="q-b") not in utc
    assert utc[excluded] == 1
    december = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert utc[key("scidex_budget_month_end_timestamp_seconds")] == december
    assert_matches(
        utc, expected(calls, [], budgets, now, now.date(), datetime(2026, 11, 30, tzinfo=UTC))
    )

    tokyo = scrape(dsn, now=now, timezone="Asia/Tokyo")
    assert tokyo[key("scidex_quest_spend_month_usd", quest="q-a")] == 8
    assert tokyo[key("scidex_budget_allocated_usd", quest="q-a")] == 80
    assert tokyo[key("scidex_budget_allocated_month_to_date_usd", quest="q-a")] == 80
    assert tokyo[key("scidex_budget_allocated_month_usd", quest="q-a")] == 80 + 160
    assert tokyo[key("scidex_budget_allocated_month_usd", quest="q-b")] == 5
    assert tokyo[key("scidex_quest_spend_month_usd", quest="q-b")] == 0
    assert key("scidex_budget_allocated_month_to_date_usd", quest="q-b") not in tokyo
    assert tokyo[excluded] == 1
    new_year = datetime(2026, 12, 31, 15, 0, tzinfo=UTC).timestamp()  # Jan 1 00:00 in Tokyo
    assert tokyo[key("scidex_budget_month_end_timestamp_seconds")] == new_year
    tokyo_midnight = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    rules = Rules(timezone="Asia/Tokyo")
    assert_matches(
        tokyo, expected(calls, [], budgets, now, date(2026, 12, 1), tokyo_midnight, rules)
    )


def test_a_failed_query_keeps_its_last_values_and_others_refresh(dsn: str) -> None:
    insert(dsn, [Call(ago(hours=1), "t1", cost_usd=D("3"))], [Impact("t1", 6.0)])
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    assert refresher.refresh(NOW)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE impact_ledger RENAME TO impact_ledger_moved")
        conn.execute(
            "INSERT INTO cost_ledger (ts, task_id, quest, layer, provider,"
            " input_tokens, output_tokens, cost_usd)"
            " VALUES (%s, 't1', 'q-a', 'Forge', 'glm-4.6', 1, 1, 1)",
            [ago(minutes=5)],
        )
    assert not refresher.refresh(NOW)
    refresher.close()
    got = parse(refresher.snapshot.text)
    assert got[key("scidex_exporter_query_success", query="window_tasks")] == 0
    assert got[key("scidex_exporter_query_errors_total", query="window_tasks")] == 1
    assert got[key("scidex_exporter_query_success", query="spend_totals")] == 1
    assert got[key("scidex_exporter_refresh_failures_total")] == 1
    assert got[key("scidex_exporter_database_up")] == 1
    # spend moved on; the window families still show what they last knew.
    assert got[key("scidex_spend_usd_total", quest="q-a", layer="Forge", provider="glm")] == 1
    t1 = {"task_id": "t1", "quest": "q-a", "layer": "Forge"}
    assert got[key("scidex_task_impact_per_usd", **t1)] == 2


def test_every_ledger_family_is_built_by_exactly_one_source_and_exported(dsn: str) -> None:
    owners = Counter(metric for kind in KINDS for metric in kind.feeds)
    assert all(n == 1 for n in owners.values()), owners
    # Excluded rows: one family, to which every source adds the reasons of its relations.
    assert set(owners) == set(c.LEDGER_METRICS) - {c.LEDGER_EXCLUDED_ROWS}
    calls, impacts, budgets = from_plan(generate.plan(4000, seed=3, end=NOW))
    insert(dsn, calls, impacts, budgets)
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh(NOW)
        labels = refresher.ledger.labels
        assert labels is not None
        ready = {type(s): s for s in refresher.sources}
        for source in refresher.sources:
            build = Build(labels, refresher.providers, refresher.settings, ready)
            built = {f.name for f in source.build(build)}
            assert built == {m.family for m in source.feeds}, type(source).__name__
    finally:
        refresher.close()
    exported = {name for name, _ in parse(refresher.snapshot.text)}
    for metric in c.LEDGER_METRICS:
        assert metric.name in exported, metric.name


def test_two_refreshers_in_one_process_each_keep_their_own_samples(
    dsn: str, pg_server: str
) -> None:
    """A refresh with no new rows reuses its own last samples, and only its own, whatever
    another refresher of the process built in between (from other values under the same
    labels)."""
    insert(dsn, *from_plan(generate.plan(3000, seed=5, end=NOW)))
    with temporary_database(pg_server, schema=True) as other_dsn:
        insert(other_dsn, *from_plan(generate.plan(3000, seed=6, end=NOW)))
        one = Refresher(load_settings({"dsn": dsn}, env={}))
        other = Refresher(load_settings({"dsn": other_dsn}, env={}))
        try:
            assert one.refresh(NOW)
            first = {f.name: f.samples for f in one.ledger.families}
            assert other.refresh(NOW)
            theirs = {f.name: f.samples for f in other.ledger.families}
            assert one.refresh(NOW)
            again = {f.name: f.samples for f in one.ledger.families}
        finally:
            one.close()
            other.close()
    spend = "scidex_spend_usd"
    assert {s.labels["quest"] for s in first[spend]} & {s.labels["quest"] for s in theirs[spend]}
    assert again.keys() == first.keys()
    for name, samples in again.items():
        assert samples == first[name], name
        assert all(a is b for a, b in zip(samples, first[name], strict=True)), name
    # and none of the other refresher's, even where a series has the same value in both
    theirs_ids = {id(s) for samples in theirs.values() for s in samples}
    assert not any(id(s) in theirs_ids for samples in again.values() for s in samples)


def test_the_demo_stays_under_10000_series_when_every_combination_fills(dsn: str) -> None:
    # The demo's ledger (generate) fills more (quest, layer, provider) combinations as it runs:
    # bound the exposition by its shape, from what one combination costs in series.
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = generate.load(conn, 20_000, end=NOW)
    got = scrape(dsn)
    per_combination = {
        name: len({k for k in got if k[0] == name})
        for name in {k[0] for k in got}
        if {"quest", "layer", "provider"}
        <= {label for label, _ in next(k for k in got if k[0] == name)[1]}
    }
    combinations = {
        tuple(dict(k[1])[label] for label in ("quest", "layer", "provider"))
        for k in got
        if k[0] == "scidex_spend_usd_total"
    }
    series_each = sum(per_combination.values()) / len(combinations)
    families = {FAMILY_OF.get(p.raw, "other") for p in generate.PROVIDERS}
    every = len(plan.quests) * len(generate.LAYERS) * len(families)
    worst = len(got) + (every - len(combinations)) * series_each
    assert len(combinations) < every  # the bound says something: some are still empty
    assert worst < 10_000, (len(got), len(combinations), series_each)
