"""The quest fold over days: a quest moves into and out of ``other``, counters never step back.

A live exporter refreshes every 6 hours over 8 days while quest X gets a budget (and with it a
label of its own) and loses it again. Every refresh must equal the reference model, a restarted
exporter must publish the same numbers, and on a real Prometheus the increase of the spend
counters over every 6 hours, around the changes too, must be the ledger's spend in them.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter.backfill import backfill
from exporter.config import load_settings
from exporter.fold import decide
from exporter.refresh import Refresher
from tests.ledger import (
    Budget,
    Call,
    Rules,
    Sample,
    expected,
    fold_days,
    insert,
    ledger_samples,
    parse,
)
from tests.prom import create_blocks, running_prometheus
from tests.test_ledger_metrics import assert_matches

SLOT = timedelta(hours=6)
DAYS = 8
SETTINGS = {"max_quests": 2, "fold_hold_days": 1}
RULES = Rules(max_quests=2, fold_hold_days=1)
SPEND = "scidex_spend_usd_total"


@dataclass
class Step:
    """One refresh: its time, the rows inserted before it and what it published."""

    at: datetime
    calls: list[Call]
    samples: dict[Sample, float]
    restarted: dict[Sample, float]  # what a new exporter published at the same time


def _start() -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=DAYS + 4)


def _slot_calls(start: datetime, i: int) -> list[Call]:
    """A and B spend most every 6 hours; X a little. In this order: their first rows."""
    at = start + i * SLOT + timedelta(hours=1)
    return [
        Call(at, f"a{i}", quest="A", cost_usd=Decimal("10")),
        Call(at, f"b{i}", quest="B", cost_usd=Decimal("8")),
        Call(at, f"x{i}", quest="X", cost_usd=Decimal("1")),
    ]


def _budgets(start: datetime) -> list[Budget]:
    """X's only budget, on day 3: X is kept on day 4 (yesterday's budget) and day 5 (held)."""
    return [Budget("X", (start + timedelta(days=3)).date(), Decimal("50"))]


def _run(dsn: str, start: datetime) -> Iterator[Step]:
    """Insert each slot's rows, then refresh at its end: one live exporter throughout."""
    budgets = _budgets(start)
    insert(dsn, [], budgets=budgets)
    live = Refresher(load_settings({"dsn": dsn, **SETTINGS}, env={}))
    calls: list[Call] = []
    try:
        for i in range(DAYS * 4):
            new = _slot_calls(start, i)
            insert(dsn, new)
            calls += new
            at = start + (i + 1) * SLOT
            assert live.refresh(at), live.health.queries
            fresh = Refresher(load_settings({"dsn": dsn, **SETTINGS}, env={}))
            try:
                assert fresh.refresh(at)
                restarted = parse(fresh.snapshot.text)
            finally:
                fresh.close()
            samples = parse(live.snapshot.text)
            yield Step(at, list(calls), ledger_samples(samples), ledger_samples(restarted))
    finally:
        live.close()


def _spend(samples: dict[Sample, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (name, labels), value in samples.items():
        if name == SPEND:
            out[dict(labels)["quest"]] += value
    return dict(out)


def test_a_quest_moves_in_and_out_of_other_and_no_counter_steps_back(dsn: str) -> None:
    start = _start()
    budgets = _budgets(start)
    steps = list(_run(dsn, start))

    def day(n: int) -> date:
        return (start + timedelta(days=n)).date()

    for before, after in itertools.pairwise(steps):
        # Every series present at both refreshes only grows.
        for sample, value in after.samples.items():
            if sample[0].endswith("_total") and sample in before.samples:
                assert value >= before.samples[sample], (after.at, sample)
        today = after.at.date()
        want = expected(after.calls, [], budgets, after.at, today, _midnight(today), RULES)
        assert_matches(after.samples, want)
        # A restarted exporter publishes the same.
        assert after.restarted == after.samples, after.at
    by_day = {step.at: _spend(step.samples) for step in steps}
    # X counts under its own label on days 4 and 5 (4 slots of $1 each), its series stays a
    # day after (frozen), then is gone; its other rows count in "other".
    assert by_day[_midnight(day(4))]["X"] == 0  # there at 0 before its first row
    assert by_day[_midnight(day(6))]["X"] == 8
    assert by_day[_midnight(day(6)) + 3 * SLOT]["X"] == 8
    assert "X" not in by_day[_midnight(day(7))]
    final = steps[-1]
    assert by_day[final.at]["other"] == DAYS * 4 - 8


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def _openmetrics(steps: list[Step]) -> str:
    """The spend counters of every refresh, with the refresh's time."""
    series: dict[Sample, list[tuple[float, float]]] = defaultdict(list)
    for step in steps:
        for sample, value in step.samples.items():
            if sample[0] == SPEND:
                series[sample].append((step.at.timestamp(), value))
    lines = ["# HELP scidex_spend_usd Spend.", "# TYPE scidex_spend_usd counter"]
    for (name, labels), points in sorted(series.items(), key=lambda kv: sorted(kv[0][1])):
        text = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
        lines += [f"{name}{{{text}}} {value!r} {at:.3f}" for at, value in points]
    return "\n".join([*lines, "# EOF", ""])


@pytest.mark.prometheus
def test_increase_across_the_fold_changes_is_the_ledger_spend(dsn: str, tmp_path: Path) -> None:
    start = _start()
    steps = list(_run(dsn, start))
    history = tmp_path / "fold.om"
    history.write_text(_openmetrics(steps), encoding="utf-8")
    create_blocks(history, tmp_path / "data")
    kept = fold_days(steps[-1].calls, _budgets(start), steps[-1].at.date(), RULES)
    with running_prometheus(tmp_path, [], storage=tmp_path / "data") as prom:
        last = steps[-1].at.timestamp()
        resets = prom.query(f"sum(resets({SPEND}[{DAYS + 1}d]))", at=last)
        assert float(resets[0]["value"][1]) == 0
        for before, after in itertools.pairwise(steps):
            rows = [c for c in after.calls if before.at < c.ts <= after.at]  # type: ignore[operator]
            want: dict[str, float] = defaultdict(float)
            for c in rows:
                local = c.ts.date()  # type: ignore[union-attr]
                want[c.quest if c.quest in kept[local] else "other"] += float(c.cost_usd)  # type: ignore[arg-type]
            total = prom.query(f"sum(increase({SPEND}[6h]))", at=after.at.timestamp())
            assert float(total[0]["value"][1]) == pytest.approx(sum(want.values())), after.at
            got = {
                r["metric"]["quest"]: float(r["value"][1])
                for r in prom.query(
                    f"sum by (quest) (increase({SPEND}[6h]))", at=after.at.timestamp()
                )
            }
            assert {q: v for q, v in got.items() if v} == pytest.approx(dict(want)), after.at


@pytest.mark.parametrize("seed", range(40))
def test_the_fold_decides_as_the_reference_model(seed: int) -> None:
    """Random spend, budgets, limits and hold: kept today, and each row's label, as the
    reference model's plain day-by-day rule."""
    rnd = random.Random(seed)
    today = date(2026, 11, 20)
    rules = Rules(max_quests=rnd.randint(1, 4), fold_hold_days=rnd.randint(0, 3))
    quests = [f"q{i}" for i in range(rnd.randint(2, 9))]
    calls = []
    for n in range(rnd.randint(1, 120)):
        ts = datetime.combine(today, datetime.min.time(), UTC) - timedelta(
            days=rnd.randint(-1, 45), hours=rnd.random() * 24
        )
        cost = Decimal(rnd.choice(["0", "0.5", "1", "3", "20"]))
        calls.append(Call(ts, f"t{n}", quest=rnd.choice(quests), cost_usd=cost))
    budgets = [
        Budget(rnd.choice(quests), today - timedelta(days=rnd.randint(0, 40)), Decimal(a))
        for a in rnd.choices(["0", "5", "50", "-1"], k=rnd.randint(0, 15))
    ]
    days: dict[date, dict[str, tuple[Decimal, int]]] = defaultdict(dict)
    for first_id, c in enumerate(calls):  # ids in list order, as insert() gives them
        quests_of_day = days[c.ts.date()]  # type: ignore[union-attr]
        cost, first = quests_of_day.get(c.quest, (Decimal(0), first_id))  # type: ignore[arg-type]
        quests_of_day[c.quest] = (cost + Decimal(c.cost_usd), min(first, first_id))  # type: ignore[arg-type,index]
    allocated: dict[tuple[str, date], Decimal] = defaultdict(Decimal)
    for b in budgets:
        if b.day < today:
            allocated[(b.quest, b.day)] += Decimal(b.allocated_usd)  # type: ignore[arg-type]
    args = (allocated, today, rules.max_quests, rules.fold_hold_days, ZoneInfo("UTC"))
    fold = decide(days, *args)
    # Decided again from a day on, keeping the earlier days' decisions: the same.
    since = today - timedelta(days=rnd.randint(0, 40))
    assert decide(days, *args, previous=fold, since=since) == fold
    kept = fold_days(calls, budgets, today, rules)
    assert fold.kept_today == kept.get(today, set())
    for c in calls:
        day = min(c.ts.date(), today)  # type: ignore[union-attr]
        want = c.quest if c.quest in kept[day] else "other"
        assert fold.attribute(c.quest, fold.segment(c.quest, c.ts)) == want, c  # type: ignore[arg-type]


def test_backfill_gives_every_refresh_of_the_fold_its_live_values(dsn: str) -> None:
    """Backfilled after the fact, the history has the values each live refresh published."""
    start = _start()
    steps = list(_run(dsn, start))
    out = io.StringIO()
    end = steps[-1].at
    settings = load_settings({"dsn": dsn, **SETTINGS}, env={})
    backfill(settings, DAYS, out, job="j", instance="i", now=end)
    history: dict[tuple[str, frozenset[tuple[str, str]]], dict[float, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(out.getvalue()):  # type: ignore[no-untyped-call]
        for s in family.samples:
            if s.name == SPEND:
                labels = frozenset(
                    (k, v) for k, v in s.labels.items() if k not in ("job", "instance")
                )
                history[(s.name, labels)][float(s.timestamp)] = s.value
    for step in steps:
        at = step.at.timestamp()
        for sample, value in step.samples.items():
            if sample[0] != SPEND:
                continue
            # The backfill's value at the refresh: its last sample at or before it.
            before = [t for t in history[sample] if t <= at]
            assert before, (step.at, sample)
            assert history[sample][max(before)] == pytest.approx(value), (step.at, sample)
    # X's series, gone from the live exporter, is in the history of the days it was kept.
    x = [k for k in history if dict(k[1])["quest"] == "X"]
    assert x and max(max(history[k].values()) for k in x) == 8


def test_the_fold_s_whole_reads_are_folded_as_they_arrive(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long history of many quests gives the fold thousands of quest-days and allocations
    to read when it starts and at every day's turn: each read folds its rows a few hundred at
    a time, none is fetched whole, and the families are the reference model's."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    calls = [
        Call(now - timedelta(days=day, hours=1), f"t{q}-{day}", quest=f"q{q}")
        for q in range(30)
        for day in range(40)
    ]
    budgets = [
        Budget(f"q{q}", (now - timedelta(days=day)).date(), Decimal(q))
        for q in range(30)
        for day in range(1, 40)
    ]
    insert(dsn, calls, budgets=budgets)
    fetched: list[int] = []
    fetchall = psycopg.Cursor.fetchall

    def counted(self: psycopg.Cursor[Any]) -> list[Any]:
        rows = fetchall(self)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(psycopg.Cursor, "fetchall", counted)
    refresher = Refresher(load_settings({"dsn": dsn, **SETTINGS}, env={}))
    try:
        assert refresher.refresh(now), refresher.health.queries
        samples = ledger_samples(parse(refresher.snapshot.text))
    finally:
        refresher.close()
    # Each source's other reads are small: today's budgets, the newest call.
    assert fetched and max(fetched) <= 30, fetched
    today = now.date()
    assert_matches(samples, expected(calls, [], budgets, now, today, _midnight(today), RULES))
    assert any(("quest", "other") in labels for _, labels in samples)  # the fold ran
