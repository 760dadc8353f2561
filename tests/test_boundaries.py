"""The edges of the documented semantics, one boundary per test, on both sides of it.

Each test pins a comparison that a one-character change (``>=`` to ``>``, ``>`` to ``>=``)
would move; the numbers are written down by hand from the rows inserted.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from exporter.backfill import backfill
from exporter.config import DEFAULT_PROVIDER_RULES, load_settings
from exporter.labels import ProviderFamilies
from exporter.refresh import Refresher
from exporter.sources.window import _crossing, _fitted
from tests.conftest import one
from tests.ledger import Budget, Call, Impact, Rules, expected, insert, key, parse
from tests.test_ledger_metrics import MIDNIGHT, NOW, TODAY, ago, assert_matches, scrape

D = Decimal
US = timedelta(microseconds=1)


def test_spend_at_exactly_local_midnight_counts_for_today(dsn: str) -> None:
    insert(
        dsn,
        [
            Call(MIDNIGHT, "t-midnight", cost_usd=D("3")),
            Call(MIDNIGHT - US, "t-yesterday", cost_usd=D("5")),
        ],
        budgets=[Budget("q-a", TODAY, D("10"))],
    )
    got = scrape(dsn)
    assert got[key("scidex_quest_spend_today_usd", quest="q-a")] == 3
    assert got[key("scidex_budget_utilization_ratio", quest="q-a")] == 0.3


def test_impact_exactly_zero_is_not_ranked(dsn: str) -> None:
    # 5e-324, the smallest positive float, is an impact too (not taken for 0)
    tasks = {"zero": 0.0, "tiny": 1e-9, "least": 5e-324}
    insert(
        dsn,
        [Call(ago(hours=1), task, cost_usd=D("1")) for task in tasks],
        [Impact(task, score) for task, score in tasks.items()],
    )
    got = scrape(dsn)
    ranked = {dict(k[1])["task_id"] for k in got if k[0] == "scidex_task_impact_per_usd"}
    assert ranked == {"tiny", "least"}


def test_waste_grace_period_boundary(dsn: str) -> None:
    big: dict[str, Any] = {"input_tokens": 1500, "output_tokens": 0}
    insert(
        dsn,
        [
            Call(NOW - timedelta(hours=6), "exactly-grace", cost_usd=D("1"), **big),
            Call(NOW - timedelta(hours=6, seconds=1), "past-grace", cost_usd=D("2"), **big),
        ],
    )
    got = scrape(dsn)
    wasted = {dict(k[1])["task_id"] for k in got if k[0] == "scidex_task_wasted_tokens"}
    assert wasted == {"past-grace"}
    assert got[key("scidex_wasted_usd", quest="q-a", layer="Forge")] == 2
    assert got[key("scidex_wasted_tasks", quest="q-a", layer="Forge")] == 1


@pytest.mark.parametrize("seeded", [True, False])
def test_window_boundary_on_the_metric_values(dsn: str, seeded: bool) -> None:
    insert(
        dsn,
        [
            Call(NOW - timedelta(days=30), "exactly-window", quest="q-in", cost_usd=D("4")),
            Call(
                NOW - timedelta(days=30, seconds=1),
                "just-before",
                quest="q-out",
                provider="glm-4.6",
                cost_usd=D("7"),
            ),
        ],
    )
    # Three refreshes: a rebuild, then steady ones reading only the rows after the watermark;
    # unseeded (a transaction running at the first refresh's seed), the first rebuild finds
    # nothing final and the second rebuilds again: each path has the boundary.
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    running = psycopg.connect(dsn)
    largest = one(running, "SELECT max(id) FROM cost_ledger")[0]
    running.rollback()
    try:
        if not seeded:  # a transaction id taken, then a later one committed: still running
            running.execute("SELECT txid_current()")
            with psycopg.connect(dsn, autocommit=True) as later:
                later.execute("SELECT txid_current()")
        for i in range(3):
            assert refresher.refresh(NOW)
            running.close()
            _assert_window_boundary(parse(refresher.snapshot.text))
            assert refresher.watermark.frozen_id == (-1 if i == 0 and not seeded else largest)
    finally:
        running.close()
        refresher.close()


def _assert_window_boundary(got: dict[Any, float]) -> None:
    assert got[key("scidex_quest_window_spend_usd", quest="q-in")] == 4
    assert key("scidex_quest_window_spend_usd", quest="q-out") not in got
    assert got[key("scidex_provider_tasks", provider="bedrock")] == 1
    assert got[key("scidex_provider_spend_usd", provider="bedrock")] == 4
    assert got[key("scidex_provider_tasks", provider="glm")] == 0
    assert got[key("scidex_provider_spend_usd", provider="glm")] == 0
    # Both still count in the cumulative families.
    assert got[key("scidex_spend_usd_total", quest="q-out", layer="Forge", provider="glm")] == 7


def test_minus_infinity_impact_counts_as_unknown(dsn: str) -> None:
    insert(
        dsn,
        [Call(ago(hours=8), "neg-inf", cost_usd=D("2"), input_tokens=2000)],
        [Impact("neg-inf", float("-inf"))],
    )
    got = scrape(dsn)
    assert got[key("scidex_quest_window_impact_score", quest="q-a")] == 0
    assert got[key("scidex_quest_impact_per_usd", quest="q-a")] == 0
    assert got[key("scidex_wasted_tasks", quest="q-a", layer="Forge")] == 1


def test_a_quest_kept_long_ago_and_not_now_leaves_no_series(dsn: str) -> None:
    # 40 days ago q-big-long-ago was the only quest and kept its label; its rows count there
    # for good, and that series is not shown once the quest is no longer kept. Its rows of
    # today would count in "other": that series is there, at 0.
    calls = [
        Call(ago(days=40), "old", quest="q-big-long-ago", cost_usd=D("100")),
        Call(ago(hours=1), "b", quest="q-b", cost_usd=D("2")),
        Call(ago(hours=1), "c", quest="q-c", cost_usd=D("1")),
    ]
    insert(dsn, calls)
    got = scrape(dsn, max_quests=2)
    spend = {dict(k[1])["quest"]: v for k, v in got.items() if k[0] == "scidex_spend_usd_total"}
    assert spend == {"q-b": 2, "q-c": 1, "other": 0}
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT, Rules(max_quests=2)))


def test_fold_ranks_by_the_days_before_yesterday_and_gives_free_places_in_row_order(
    dsn: str,
) -> None:
    calls = [
        Call(ago(days=3), "a1", quest="q-a", cost_usd=D("10")),
        Call(ago(days=3), "b1", quest="q-b", cost_usd=D("5")),
        Call(ago(days=3), "c1", quest="q-c", cost_usd=D("1")),  # no place left that day
        Call(ago(hours=2), "n1", quest="q-new", cost_usd=D("50")),
        Call(ago(hours=1), "a2", quest="q-a", cost_usd=D("1")),
        Call(ago(hours=1), "c2", quest="q-c", cost_usd=D("7")),  # q-new took the free place
    ]
    insert(dsn, calls)
    got = scrape(dsn, max_quests=2)
    spend = {dict(k[1])["quest"]: v for k, v in got.items() if k[0] == "scidex_spend_usd_total"}
    assert spend == {"q-a": 11, "q-b": 5, "q-new": 50, "other": 8}
    assert got[key("scidex_quest_spend_today_usd", quest="other")] == 7
    assert_matches(got, expected(calls, [], [], NOW, TODAY, MIDNIGHT, Rules(max_quests=2)))


def test_two_raw_providers_of_one_family_sum_exactly(dsn: str) -> None:
    insert(
        dsn,
        [
            Call(
                ago(hours=1),
                "t1",
                provider="bedrock/us.anthropic.claude-sonnet-4",
                cost_usd=D("0.1"),
            ),
            Call(
                ago(hours=1), "t2", provider="bedrock/us.anthropic.claude-opus-4", cost_usd=D("0.2")
            ),
        ],
    )
    got = scrape(dsn)
    labels = {"quest": "q-a", "layer": "Forge", "provider": "bedrock"}
    assert got[key("scidex_spend_usd_total", **labels)] == 0.3  # not 0.30000000000000004
    assert got[key("scidex_provider_spend_usd", provider="bedrock")] == 0.3


def test_a_raw_provider_matching_two_rules_gets_the_first() -> None:
    families = ProviderFamilies(DEFAULT_PROVIDER_RULES)
    # "max/MiniMax-M2" matches minimax (third rule) and max (fifth): minimax comes first.
    assert families.family("max/MiniMax-M2") == "minimax"
    assert families.family("codex/bedrock-proxy") == "bedrock"


def test_backfill_counts_a_row_from_the_next_hour_on(dsn: str) -> None:
    now = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
    insert(
        dsn,
        [Call(datetime(2026, 11, 20, 10, 30, tzinfo=UTC), "t1", cost_usd=D("2"))],
        budgets=[Budget("q-a", now.date(), D("10"))],
    )
    out = io.StringIO()
    settings = load_settings({"dsn": dsn}, env={})
    backfill(settings, 1, out, job="j", instance="i", now=now)
    samples: dict[tuple[str, float], float] = {}
    for line in out.getvalue().splitlines():
        if line.startswith(("scidex_quest_spend_today_usd{", "scidex_budget_utilization_ratio{")):
            series, value, ts = line.rsplit(" ", 2)
            samples[(series.split("{")[0], float(ts))] = float(value)
    at = {h: datetime(2026, 11, 20, h, tzinfo=UTC).timestamp() for h in (10, 11)}
    assert samples[("scidex_quest_spend_today_usd", at[10])] == 0
    assert samples[("scidex_quest_spend_today_usd", at[11])] == 2
    assert samples[("scidex_budget_utilization_ratio", at[10])] == 0
    assert samples[("scidex_budget_utilization_ratio", at[11])] == 0.2


def _crossed(pg_server: str, sql_type: str, sums: tuple[Any, ...]) -> tuple[Any, ...]:
    columns = ", ".join(["%s::numeric"] + [f"%s::{sql_type}" for _ in sums[1:]])  # cost: numeric
    names = "cost, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens"
    source = f"(SELECT * FROM (VALUES ({columns})) s({names}))"
    crossing = ", ".join(f"{expr} AS {name}" for name, expr in _crossing("v").items())
    with psycopg.connect(pg_server) as conn:
        return tuple(one(conn, f"SELECT {crossing} FROM {_fitted(source, 'v')}", sums))


def test_window_sums_cross_as_int8_only_while_whole_and_within_int64(pg_server: str) -> None:
    # (cost, input, output, cache read, cache write) -> the int8 columns (the cost in 10^-12
    # $, a NULL count as 0), or None: they cross as they are. The cost is summed as numeric
    # (queries.COST), the counts in their column's type.
    cases: list[tuple[str, tuple[Any, ...], tuple[int, ...] | None]] = [
        ("numeric", (D("1.5"), 10, 20, None, None), (1_500_000_000_000, 10, 20, 0, 0)),
        ("numeric", (D("1E-12"), 0, 0, 0, 0), (1, 0, 0, 0, 0)),
        ("numeric", (D("1E-13"), 0, 0, 0, 0), None),
        ("numeric", (D("9223372.036854775807"), 0, 0, 0, 0), (2**63 - 1, 0, 0, 0, 0)),
        ("numeric", (D("9223372.036854775808"), 0, 0, 0, 0), None),
        ("numeric", (D(0), 2**63 - 1, 0, 0, 2**63 - 1), (0, 2**63 - 1, 0, 0, 2**63 - 1)),
        ("numeric", (D(0), 0, 2**63, 0, 0), None),
        ("numeric", (D(0), 0, 0, D("2.5"), 0), None),
        ("float8", (D(1), 3.0, 2.0**63 - 1024, 0.0, None), (10**12, 3, 2**63 - 1024, 0, 0)),
        ("float8", (D(1), 2.5, 0.0, 0.0, 0.0), None),
        ("float8", (D(1), 0.0, 0.0, 2.0**63, 0.0), None),
    ]
    for sql_type, sums, whole in cases:
        got = _crossed(pg_server, sql_type, sums)
        ints, exact = got[:5], got[5:]
        if whole is None:
            assert ints == (None,) * 5, sums
            assert exact == sums, sums  # as they are, in their own type
        else:
            assert ints == whole and exact == (None,) * 5, sums


def test_window_sums_finer_than_the_units_or_past_int64_stay_exact(dsn: str) -> None:
    calls = [
        Call(ago(hours=1), "fine", cost_usd=D("0.1000000000001")),  # finer than 10^-12 $
        Call(ago(days=2), "big", input_tokens=2**62, cost_usd=D("1")),
        Call(ago(days=2, hours=1), "big", input_tokens=2**62, cost_usd=D("2")),  # 2**63 in all
        Call(ago(hours=1), "plain", cost_usd=D("0.25")),
    ]
    impacts = [Impact("fine", 1.0), Impact("plain", 1.0)]
    insert(dsn, calls, impacts)
    got = scrape(dsn)
    cost = {dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_cost_usd"}
    assert cost == {"fine": 0.1000000000001, "plain": 0.25}
    wasted = {
        dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_wasted_tokens"
    }
    assert wasted == {"big": float(2**63 + 100)}
    assert_matches(got, expected(calls, impacts, [], NOW, TODAY, MIDNIGHT, Rules()))


def test_window_tokens_with_a_fraction_stay_exact(dsn: str) -> None:
    """A numeric token column may hold fractions (the contract allows it): a task's tokens,
    and their list price, are summed exactly, as the cumulative counters sum them, so 1,000.75
    tokens are over a waste threshold of 1,000 (truncated, they were not)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for column in ("input_tokens", "output_tokens", "cache_read_tokens"):
            conn.execute(f"ALTER TABLE cost_ledger ALTER COLUMN {column} TYPE numeric")
    max_ = "max/claude-sonnet-4"  # a subscription: its list price is from the tokens alone
    calls = [
        Call(
            ago(days=2), "frac", provider=max_, input_tokens=D("600.25"), output_tokens=D("400.25")
        ),
        Call(ago(days=3), "frac", provider=max_, input_tokens=D("0.25"), output_tokens=0),
        Call(
            ago(days=3),
            "frac",
            provider=max_,
            input_tokens=0,
            output_tokens=0,
            cache_read_tokens=D(".75"),
        ),
        Call(ago(hours=1), "plain", cost_usd=D("0.25")),
    ]
    impacts = [Impact("plain", 1.0)]
    insert(dsn, calls, impacts)
    got = scrape(dsn)
    wasted = {
        dict(k[1])["task_id"]: v for k, v in got.items() if k[0] == "scidex_task_wasted_tokens"
    }
    assert wasted == {"frac": 1000.75}
    assert_matches(got, expected(calls, impacts, [], NOW, TODAY, MIDNIGHT, Rules()))
