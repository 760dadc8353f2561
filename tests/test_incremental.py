"""Incremental cumulative sums equal a full recomputation, whatever the commit order."""

from __future__ import annotations

import json
import random
import tempfile
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import psycopg
import pytest

from exporter import generate
from exporter.config import load_settings
from exporter.incremental import Sums
from exporter.refresh import Refresher
from exporter.sources import Instants, WindowSource
from exporter.sources.spend import SPEND_TOTALS, SpendSource
from exporter.sources.window import WINDOW_TASKS, window_tail
from tests.conftest import one
from tests.ledger import ledger_samples, parse

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
COLUMNS = "(ts, task_id, quest, layer, provider, input_tokens, output_tokens, cost_usd)"
PROVIDERS = ["bedrock/x", "glm-4.6", "MiniMax-M2", "max/claude-opus-4", "local/llama"]


def _task(n: int) -> str:
    """Task ``n``'s id: every third a canonical UUID (the task store packs those; all zero
    bytes and all 0xff among them), one of them uppercase (not canonical: kept as text)."""
    if n % 3:
        return f"t{n}"
    bits = 2**128 - 1 if n == 30 else n * 0x0123456789ABCDEF0123456789ABCDEF % 2**128
    return str(UUID(int=bits)).upper() if n == 9 else str(UUID(int=bits))


def _rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    out = []
    for _ in range(n):
        cost = rng.choice([Decimal(rng.randint(0, 5000)) / 1000, Decimal("-1"), Decimal("NaN")])
        out.append(
            (
                # Whole days, so rows of one task often tie on ts (ids break the tie); up to 8
                # days ahead, for the tests that move the clock on.
                NOW - timedelta(days=rng.randint(-8, 40)),
                _task(rng.randint(0, 30)),
                f"q{rng.randint(0, 5)}",
                rng.choice(["Forge", "Agora"]),
                rng.choice(PROVIDERS),
                rng.randint(0, 5000),
                rng.randint(-1, 500),
                cost,
            )
        )
    return out


def _insert(conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.cursor().executemany(
        f"INSERT INTO cost_ledger {COLUMNS} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", rows
    )


def _measure(conn: psycopg.Connection, rng: random.Random, n: int) -> None:
    """Measure or re-measure the impact of ``n`` random tasks, as the platform does: every
    write sets ``measured_at`` to the time of the write (the contract, docs/semantics.md). A
    task may also get a row before it is measured: no score and no time."""
    for _ in range(n):
        pending = rng.random() < 0.15
        score = None if pending else rng.choice([None, 0.0, -0.5, 0.3, 0.5, 0.9, 2.0, 7.5])
        conn.execute(
            "INSERT INTO impact_ledger (task_id, impact_score, measured_at)"
            " VALUES (%(task)s, %(score)s, CASE WHEN %(pending)s THEN NULL ELSE now() END)"
            " ON CONFLICT (task_id) DO UPDATE SET impact_score = excluded.impact_score,"
            " measured_at = now()",
            {"task": _task(rng.randint(0, 30)), "score": score, "pending": pending},
        )


def _families(refresher: Refresher, now: datetime = NOW) -> dict[Any, float]:
    """Every ledger family (cumulative and window) after one refresh at ``now``."""
    assert refresher.refresh(now), refresher.health.queries
    return ledger_samples(parse(refresher.snapshot.text))


def _full(dsn: str, now: datetime = NOW, **values: Any) -> dict[Any, float]:
    settings = {"dsn": dsn, "reconcile_interval_seconds": 0, **values}
    fresh = Refresher(load_settings(settings, env={}))
    try:
        return _families(fresh, now)
    finally:
        fresh.close()


def test_a_late_commit_with_a_smaller_id_is_never_skipped(dsn: str) -> None:
    rng = random.Random(1)
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    with psycopg.connect(dsn, autocommit=True) as writer, psycopg.connect(dsn) as late:
        _insert(late, _rows(rng, 5))  # takes the smaller ids, and stays uncommitted
        late_ids = one(late, "SELECT min(id), max(id) FROM cost_ledger")
        _insert(writer, _rows(rng, 5))  # larger ids, committed first
        for _ in range(3):
            assert _families(incremental) == _full(dsn)
            assert incremental.watermark.frozen_id < late_ids[0]  # never past the open rows
        late.commit()
        _insert(writer, _rows(rng, 3))
        for _ in range(3):
            assert _families(incremental) == _full(dsn)
        # Once the late transaction is over, the watermark moves past its rows.
        assert incremental.watermark.frozen_id >= late_ids[1]
    incremental.close()


LAST_ID = "SELECT currval(pg_get_serial_sequence('cost_ledger', 'id'))"


def test_a_transaction_that_took_its_id_after_the_last_commit_is_never_skipped(
    dsn: str,
) -> None:
    """V takes a transaction id; T then inserts (a smaller ledger id, a later transaction id);
    V inserts and commits first. A snapshot's xmax is the last completed id + 1, so T is in no
    snapshot's running list: the watermark must still wait for it."""
    rng = random.Random(11)
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        with psycopg.connect(dsn, autocommit=True) as writer:
            _insert(writer, _rows(rng, 5))
        assert _families(incremental) == _full(dsn)
        with psycopg.connect(dsn) as v, psycopg.connect(dsn) as t:
            v.execute("SELECT txid_current()")
            _insert(t, _rows(rng, 1))
            t_id = one(t, LAST_ID)[0]  # the id of T's own row
            _insert(v, _rows(rng, 1))
            v.commit()
            for _ in range(2):
                assert _families(incremental) == _full(dsn)
                assert incremental.watermark.frozen_id < t_id
            t.commit()
        assert _families(incremental) == _full(dsn)
    finally:
        incremental.close()


def test_an_exporters_first_refresh_already_takes_the_ledger_as_final(dsn: str) -> None:
    """With no transaction running, the first refresh reads every id as final (the watermark
    is seeded before it), so the second reads only the rows after them: an exporter's start
    reads the whole ledger and rebuilds the window once, not twice."""
    rng = random.Random(5)
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        with psycopg.connect(dsn, autocommit=True) as writer:
            _insert(writer, _rows(rng, 20))
            largest = one(writer, "SELECT max(id) FROM cost_ledger")[0]
            assert _families(incremental) == _full(dsn)
            assert incremental.watermark.frozen_id == largest
            assert incremental.source(WindowSource).tasks.frozen_id == largest
            _insert(writer, _rows(rng, 5))
            assert _families(incremental) == _full(dsn)
    finally:
        incremental.close()


@pytest.mark.parametrize("seed", range(16))
def test_random_batches_and_commit_orders_match_a_full_recomputation(dsn: str, seed: int) -> None:
    random_batches(dsn, seed)


def random_batches(dsn: str, seed: int) -> None:
    """Insert, hold open, commit and roll back random batches while the clock moves; every
    incremental refresh must equal a full recomputation.

    The rankings publish only a few of the tasks (and hold one more, see conftest.py), and
    only two quests keep their label, so tasks that leave the rankings, rankings looking at
    every task again, and quests folded into `other` (several raw values summed into one
    series) happen often."""
    rng = random.Random(seed)
    tops = {"top_efficiency_tasks": 3, "top_waste_tasks": 2, "max_quests": 2}
    incremental = Refresher(load_settings({"dsn": dsn, **tops}, env={}))
    open_txns: list[psycopg.Connection] = []
    with psycopg.connect(dsn, autocommit=True) as writer:
        try:
            for step in range(25):
                # Time moves on too: tasks leave the window, and come back with new rows.
                now = NOW + timedelta(days=2 * step)
                op = rng.random()
                if op < 0.4:
                    _insert(writer, _rows(rng, rng.randint(1, 20)))
                elif op < 0.55 and len(open_txns) < 3:
                    conn = psycopg.connect(dsn)
                    _insert(conn, _rows(rng, rng.randint(1, 10)))
                    open_txns.append(conn)
                elif op < 0.75 and open_txns:
                    conn = open_txns.pop(rng.randrange(len(open_txns)))
                    conn.rollback() if rng.random() < 0.2 else conn.commit()
                    conn.close()
                if rng.random() < 0.5:  # impacts measured, and measured again
                    _measure(writer, rng, rng.randint(1, 6))
                assert _families(incremental, now) == _full(dsn, now, **tops)
                # Tasks that left the window are dropped: what is kept follows the window.
                (in_window,) = one(
                    writer,
                    "SELECT count(DISTINCT task_id) FROM cost_ledger WHERE ts >= %s",
                    [now - timedelta(days=30)],
                )
                assert len(incremental.source(WindowSource).tasks.final) <= in_window
        finally:
            for conn in open_txns:
                conn.close()
    assert incremental.watermark.frozen_id > 0, "the watermark never moved: nothing incremental"
    assert incremental.source(WindowSource).tasks.frozen_id > 0, (
        "the window's tasks were rebuilt every time"
    )
    incremental.close()


def test_labels_that_change_within_a_day_match_a_full_recomputation(dsn: str) -> None:
    """Between two whole-ledger reads (within a day), each batch makes another model, layer
    and quest the largest: the series the kept counter sums go to change, so they are summed
    again rather than changed key by key."""
    limits = {"max_models": 1, "max_layers": 1, "max_quests": 2}
    incremental = Refresher(load_settings({"dsn": dsn, **limits}, env={}))
    models, layers = set(), set()
    with psycopg.connect(dsn, autocommit=True) as writer:
        for step in range(10):
            # Each row outspends every row before it, in dollars and in tokens.
            row = (
                NOW - timedelta(hours=1),
                f"t{step}",
                f"q{step % 3}",
                ["Forge", "Agora"][step % 2],
                PROVIDERS[step % 4],
                4**step,
                4**step,
                Decimal(2**step) / 8,
            )
            _insert(writer, [row])
            now = NOW + timedelta(minutes=step)
            got = _families(incremental, now)
            assert got == _full(dsn, now, **limits)
            if step > 0:
                _, params = incremental.statement(
                    SPEND_TOTALS.name, Instants.at(now, incremental.settings)
                )
                assert params["after"] is not None  # within the day: the tail only
            spend = {k[1] for k in got if k[0] == "scidex_spend_usd_total"}
            models |= {k[1] for k in got if k[0] == "scidex_model_spend_usd_total"}
            layers |= {dict(labels)["layer"] for labels in spend}
    assert len(models) > 2 and {"Forge", "Agora"} <= layers, "the kept labels never changed"
    incremental.close()


@pytest.mark.parametrize("long_history", [False, True])
def test_spend_today_and_this_month_move_at_midnight(dsn: str, long_history: bool) -> None:
    """The recent spans (today, this month, the label weights' days) follow the new rows within
    a day, and move when the day (and here the month) turns."""
    evening = datetime(2026, 11, 30, 23, 50, tzinfo=UTC)
    rows = [
        (datetime(2026, 11, 15, 12, 0, tzinfo=UTC), "t1", "q1", "Forge", "glm-4.6", 5, 5, 3),
        (datetime(2026, 11, 30, 23, 0, tzinfo=UTC), "t2", "q1", "Forge", "glm-4.6", 5, 5, 2),
    ]
    if long_history:  # a year before: whole-ledger reads scan the recent rows apart
        rows.append((datetime(2025, 11, 1, tzinfo=UTC), "t0", "q1", "Forge", "glm-4.6", 5, 5, 9))
    today = ("scidex_quest_spend_today_usd", frozenset({("quest", "q1")}))
    month = ("scidex_quest_spend_month_usd", frozenset({("quest", "q1")}))
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, rows)
        for _ in range(3):  # until the watermark has settled
            got = _families(incremental, evening)
        assert got == _full(dsn, evening)
        assert (got[today], got[month]) == (2, 5)
        assert incremental.source(SpendSource)._long_history is long_history
        _insert(
            writer, [(evening + timedelta(minutes=15), "t3", "q1", "Forge", "glm-4.6", 5, 5, 7)]
        )
        after_midnight = evening + timedelta(minutes=20)
        got = _families(incremental, after_midnight)
        assert got == _full(dsn, after_midnight)
        assert (got[today], got[month]) == (7, 7)
        _insert(writer, [(after_midnight, "t3", "q1", "Forge", "glm-4.6", 5, 5, 1)])
        later = after_midnight + timedelta(minutes=5)
        _, params = incremental.statement(
            SPEND_TOTALS.name, Instants.at(later, incremental.settings)
        )
        assert params["after"] is not None  # within the day: the tail only
        got = _families(incremental, later)
        assert got == _full(dsn, later)
        assert (got[today], got[month]) == (8, 8)
    incremental.close()


_MODEL_COLUMNS = "model, cache_read_tokens, cache_write_tokens, reasoning_tokens"


def _with_models(rng: random.Random, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``_rows`` with a model column (raw, in two cases, or none) and cache and reasoning
    tokens (or none)."""
    return [
        (
            *row,
            rng.choice([None, "m-1", "M-1"]),
            rng.choice([None, 0, 70]),
            rng.choice([None, 30]),
            rng.choice([None, 9]),
        )
        for row in rows
    ]


def _spans(rows: list[tuple[Any, ...]], now: datetime, window_days: int) -> dict[str, Any]:
    """The reference: the valid rows' spend (and tokens: fresh input, output with its
    reasoning, cache reads and writes) in the label weights' whole days by raw layer and
    (provider, model), this month's and today's spend by raw quest (UTC midnights)."""
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    starts = today - timedelta(days=window_days), today.replace(day=1), today
    out: dict[str, dict[Any, Any]] = {k: {} for k in ("layer", "cost", "tokens", "month", "today")}

    def put(name: str, key: Any, value: Any) -> None:
        out[name][key] = out[name].get(key, 0) + value

    for row in rows:
        ts, _, quest, layer, provider, fresh, output, cost, model, read, written, _ = row
        if cost.is_nan() or cost < 0 or fresh < 0 or output < 0:
            continue
        if ts >= starts[0]:
            put("layer", layer, cost)
            put("cost", (provider, model), cost)
            put("tokens", (provider, model), fresh + output + (read or 0) + (written or 0))
        for name, start in zip(("month", "today"), starts[1:], strict=True):
            if ts >= start:
                put(name, quest, cost)
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_the_recent_sums_are_kept_by_layer_model_and_quest(dsn: str, seed: int) -> None:
    """What the families read of the recent spans is summed as rows fold, by raw layer and
    model (the label weights) and by raw quest (this month's and today's spend), not kept per
    series and span; after a whole-ledger read and after steady ones, it is the valid rows'."""
    rng = random.Random(seed)
    rows = _with_models(rng, _rows(rng, 300))
    insert = (
        f"INSERT INTO cost_ledger {COLUMNS[:-1]}, {_MODEL_COLUMNS})"
        f" VALUES ({', '.join(['%s'] * len(rows[0]))})"
    )
    window_days = 10  # some rows before the label weights' days, in this month or not
    refresher = Refresher(load_settings({"dsn": dsn, "window_days": window_days}, env={}))
    try:
        with psycopg.connect(dsn, autocommit=True) as writer:
            writer.cursor().executemany(insert, rows)
            _families(refresher)
            for _ in range(3):  # new rows, read as the tail and then as final sums
                batch = _with_models(rng, _rows(rng, 40))
                writer.cursor().executemany(insert, batch)
                rows += batch
                _families(refresher)
        _, params = refresher.statement(SPEND_TOTALS.name, Instants.at(NOW, refresher.settings))
        assert params["after"] is not None  # the last refreshes read the new rows only
        recent = refresher.source(SpendSource).totals.recent
        got = {
            "layer": recent.layer_cost,
            "cost": recent.model_cost,
            "tokens": recent.model_tokens,
            "month": recent.month,
            "today": recent.today,
        }
        assert got == _spans(rows, NOW, window_days)
    finally:
        refresher.close()


def test_reconciliation_catches_ids_assigned_out_of_sequence(dsn: str) -> None:
    clock = [1_000_000.0]
    incremental = Refresher(
        load_settings({"dsn": dsn, "reconcile_interval_seconds": 600}, env={}),
        clock=lambda: clock[0],
    )
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, _rows(rng, 20))
        for _ in range(3):
            _families(incremental)
            clock[0] += 30
        frozen = incremental.watermark.frozen_id
        assert frozen >= 20
        # An explicit id under the watermark (a view whose ids are not a sequence) is invisible
        # to the incremental path by design...
        writer.execute("ALTER TABLE cost_ledger DROP CONSTRAINT cost_ledger_pkey")
        writer.execute(
            f"INSERT INTO cost_ledger (id, {COLUMNS[1:-1]}) VALUES"
            " (1, %s, 't-x', 'q-late', 'Forge', 'glm-4.6', 1, 1, 7)",
            [NOW - timedelta(days=100)],
        )
    late = (
        "scidex_spend_usd_total",
        frozenset({("quest", "q-late"), ("layer", "Forge"), ("provider", "glm")}),
    )
    assert late not in _families(incremental)
    clock[0] += 600  # ...until the periodic full reconciliation
    got = _families(incremental)
    assert got[late] == 7
    assert got == _full(dsn)
    incremental.close()


def test_an_impact_written_outside_the_contract_shows_at_the_reconciliation(dsn: str) -> None:
    """A re-measurement backdated by more than impact_lag_seconds is not read by a steady
    refresh (docs/semantics.md); the periodic full reconciliation reads it."""
    clock = [1_000_000.0]
    incremental = Refresher(
        load_settings({"dsn": dsn, "reconcile_interval_seconds": 600}, env={}),
        clock=lambda: clock[0],
    )
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, [(NOW - timedelta(days=1), "t-a", "q1", "Forge", "glm-4.6", 5, 5, 2)])
        writer.execute(
            "INSERT INTO impact_ledger (task_id, impact_score, measured_at)"
            " VALUES ('t-a', 1, now())"
        )
        for _ in range(3):
            got = _families(incremental)
            clock[0] += 30
        assert _impact(got, "t-a") == 1
        # Within the lag: read by the next refresh.
        writer.execute(
            "UPDATE impact_ledger SET impact_score = 3, measured_at = now() - interval '4 min'"
        )
        assert _impact(_families(incremental), "t-a") == 3
        clock[0] += 30
        # Backdated past the lag: the contract is broken, and the steady path keeps 3...
        writer.execute(
            "UPDATE impact_ledger SET impact_score = 5, measured_at = now() - interval '1 hour'"
        )
        assert _impact(_families(incremental), "t-a") == 3
    clock[0] += 600  # ...until the periodic full reconciliation
    got = _families(incremental)
    assert _impact(got, "t-a") == 5
    assert got == _full(dsn)
    incremental.close()


def _impact(families: dict[Any, float], task: str) -> float:
    (value,) = [
        v
        for (name, labels), v in families.items()
        if name == "scidex_task_impact_score" and ("task_id", task) in labels
    ]
    return value


def test_rows_with_negative_ids_are_counted_once(dsn: str) -> None:
    """A full recomputation reads every id; the steady path must not read them again."""
    with psycopg.connect(dsn, autocommit=True) as writer:
        for row_id in (-7, -2):
            writer.execute(
                f"INSERT INTO cost_ledger (id, {COLUMNS[1:-1]}) VALUES"
                " (%s, %s, 't-n', 'q-neg', 'Forge', 'glm-4.6', 1, 1, 2)",
                [row_id, NOW - timedelta(days=1)],
            )
    neg = (
        "scidex_spend_usd_total",
        frozenset({("quest", "q-neg"), ("layer", "Forge"), ("provider", "glm")}),
    )
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        for i in range(4):
            with psycopg.connect(dsn, autocommit=True) as writer:
                _insert(writer, [(NOW, "t-p", "q-pos", "Forge", "glm-4.6", 1, 1, 1)])
            got = _families(incremental)
            assert got[neg] == 4, i
            assert got == _full(dsn)
    finally:
        incremental.close()


def test_the_steady_state_reads_only_the_new_rows(dsn: str) -> None:
    rng = random.Random(3)
    instants = Instants.at(NOW, load_settings({}, env={}))
    old = [(NOW - timedelta(days=100), "t-old", "q1", "Forge", "glm-4.6", 5, 5, 1)] * 30
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, _rows(rng, 5000) + old)
        # Impacts measured a day ago: of the window's tasks, and of 5,000 tasks long gone.
        writer.execute(
            "INSERT INTO impact_ledger (task_id, impact_score, measured_at)"
            " SELECT t, 1, now() - interval '1 day' FROM"
            " (SELECT 't' || g FROM generate_series(0, 30) g"
            "  UNION ALL SELECT 'gone-' || g FROM generate_series(1, 5000) g) AS x(t)"
        )
        writer.execute("ANALYZE cost_ledger")
        writer.execute("ANALYZE impact_ledger")
        top = one(writer, "SELECT max(id) FROM cost_ledger")[0]
        plan = "\n".join(
            r[0]
            for r in writer.execute(
                "EXPLAIN " + SPEND_TOTALS.sql,
                {"after": top - 10, "safe": top - 5, **instants.params()},
            ).fetchall()
        )
    assert "cost_ledger_pkey" in plan, plan  # an index range scan, not a scan of the history
    incremental = Refresher(load_settings({"dsn": dsn}, env={}))
    for _ in range(3):
        _families(incremental)
    assert (
        incremental.watermark.frozen_id == incremental.source(WindowSource).tasks.frozen_id == top
    )
    # New rows of tracked tasks, of a new task, and of a task back in the window after 100
    # days: the window statement reads them, and the old task's history once.
    new = [*_rows(rng, 10), (NOW, "t-new", "q1", "Forge", "glm-4.6", 5, 5, 1), (NOW, *old[0][1:])]
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, new)
        writer.execute(
            "UPDATE impact_ledger SET impact_score = 2, measured_at = now()"
            " WHERE task_id IN ('t1', 't2')"
        )
        assert incremental.refresh(NOW)
        window = incremental.source(WindowSource)
        assert window.tasks.final.impact("t1") == window.tasks.final.impact("t2") == 2.0
        writer.execute("UPDATE impact_ledger SET measured_at = now() WHERE task_id = 't3'")
        with psycopg.connect(dsn) as conn:
            sql, params = incremental.statement(
                WINDOW_TASKS.name, Instants.at(NOW, incremental.settings)
            )
            periods = incremental.sources[0].prices.periods
            assert sql == window_tail(incremental.columns, periods).sql
            read = _rows_read(_explain_analyze(conn, sql, params), "cost_ledger")
            # The entering tasks' history, and only the impacts measured since.
            history = window.history(incremental.columns, json.dumps(["t-new", "t-old"]))
            plan = _explain_analyze(conn, *history)
            history_read = _rows_read(plan, "cost_ledger")
            impacts_read = _rows_read(plan, "impact_ledger")
            # Spend today, this month and the label weights: the tail too, within a day.
            _, spend = incremental.statement(
                SPEND_TOTALS.name, Instants.at(NOW, incremental.settings)
            )
            assert spend["after"] is not None
    assert read <= 2 * (len(new) + len(old)) + 10, read
    assert history_read <= 2 * len(old) + 5, history_read  # its sums, and its latest row
    # t1 and t2 (less than the lag ago), t3, and the entering tasks' own: not 5,031 impacts.
    assert impacts_read <= 10, impacts_read
    incremental.close()


def _explain_analyze(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> Any:
    """The plan of ``sql`` bound as the exporter binds it (server side, never prepared)."""
    [(plan,)] = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params, prepare=False
    ).fetchall()
    return plan[0]["Plan"]


def _scans(plan: dict[str, Any], relation: str) -> Iterator[dict[str, Any]]:
    """The plan's scan nodes of ``relation``."""
    if plan.get("Relation Name") == relation:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child, relation)


def _rows_read(plan: dict[str, Any], relation: str) -> float:
    return float(
        sum(
            (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
            for n in _scans(plan, relation)
        )
    )


def test_the_window_families_read_the_window_not_the_history(dsn: str) -> None:
    rng = random.Random(11)
    with psycopg.connect(dsn, autocommit=True) as writer:
        generate.load(writer, 40_000, days=300, end=NOW)
        # Some of the window's tasks also ran months ago: their earlier rows are read too.
        window_start = NOW - timedelta(days=30)
        recent = writer.execute(
            "SELECT DISTINCT task_id FROM cost_ledger WHERE ts >= %s ORDER BY 1 LIMIT 30",
            [window_start],
        ).fetchall()
        _insert(
            writer,
            [
                (
                    NOW - timedelta(days=rng.uniform(60, 200)),
                    task,
                    "q-x",
                    "Forge",
                    "glm-4.6",
                    5,
                    5,
                    1,
                )
                for (task,) in recent
                for _ in range(50)
            ],
        )
        writer.execute("VACUUM ANALYZE cost_ledger")
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        assert refresher.refresh(NOW)
        instants = Instants.at(NOW, refresher.settings)
        assert instants.window_start == window_start
        with psycopg.connect(dsn) as conn:
            plan = _explain_analyze(conn, *refresher.statement(WINDOW_TASKS.name, instants))
            total, window, history = one(
                conn,
                "SELECT count(*), count(*) FILTER (WHERE ts >= %(start)s),"
                " count(*) FILTER (WHERE ts < %(start)s AND task_id IN"
                "   (SELECT task_id FROM cost_ledger WHERE ts >= %(start)s))"
                " FROM cost_ledger",
                {"start": window_start},
            )
    finally:
        refresher.close()
    read = _rows_read(plan, "cost_ledger")
    # The window's rows plus the earlier rows of the window's tasks, not the whole history.
    assert window > 2000 and history >= 1500 and total > 5 * (window + history)
    assert read <= 1.2 * (window + history) + 50, (read, window, history)


def test_excluded_rows_are_classified_only_when_there_are_some(dsn: str) -> None:
    """The main scan reads the ledger once, excluded rows or not, and says whether it saw any;
    only then does a refresh send the statement that reads why (a second scan)."""
    rng = random.Random(5)
    settings = load_settings({"dsn": dsn, "reconcile_interval_seconds": 0}, env={})
    params = {"after": None, "safe": 10**9, **Instants.at(NOW, settings).params()}
    refresher = Refresher(settings)
    try:
        with psycopg.connect(dsn, autocommit=True) as writer:
            _insert(writer, _rows(rng, 500))
            writer.execute("UPDATE cost_ledger SET cost_usd = 0.5, output_tokens = 10")  # valid

            def ledger_reads() -> tuple[float, list[str | None], set[str], bool]:
                plan = _explain_analyze(writer, SPEND_TOTALS.sql, params)
                scans = _scans(plan, "cost_ledger")
                whole = [n for n in scans if n["Node Type"] == "Seq Scan" and n["Actual Loops"]]
                rows = writer.execute(SPEND_TOTALS.sql, params, prepare=False).fetchall()
                sent = _sent(refresher)
                return (
                    _rows_read(plan, "cost_ledger"),
                    [n.get("Filter") for n in whole],
                    {kind for kind, *_ in rows},
                    # the reasons' statement, the only one that classifies rows by reason
                    refresher.columns.reason.encode() in sent,
                )

            clean = ledger_reads()
            writer.execute("UPDATE cost_ledger SET cost_usd = 'NaN' WHERE id = 7")
            dirty = ledger_reads()
    finally:
        refresher.close()
    # The ledger once with no id test per row, and the largest id from the end of its index.
    assert clean == (500 + 1, [None], {"sum", "largest"}, False)
    assert dirty == (500 + 1, [None], {"sum", "excluded", "largest"}, True)


def _sent(refresher: Refresher) -> bytes:
    """What a refresh sends PostgreSQL: libpq's trace of the refresher's connection."""
    assert refresher.refresh(NOW)  # connected
    conn = refresher._conn
    assert conn is not None
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            assert refresher.refresh(NOW)
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return trace.read()


def test_every_statement_is_planned_with_its_parameters(dsn: str) -> None:
    """No server-side prepared statement: its generic plan could scan the ledger for a tail."""
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, _rows(random.Random(2), 50))
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        for _ in range(8):  # psycopg's default prepares a statement on its fifth execution
            assert refresher.refresh(NOW)
        conn = refresher._conn
        assert conn is not None
        assert one(conn, "SELECT count(*) FROM pg_prepared_statements") == (0,)
    finally:
        refresher.close()


def test_counters_that_failed_part_way_sum_everything_again() -> None:
    """A refresh that fails while the kept counter sums change leaves them half changed: the
    next one must not take the same keys out again."""
    from exporter.families import LabelGuard
    from exporter.labels import ProviderFamilies
    from exporter.prices import PriceBook
    from exporter.sources.spend import Counters, Key, cumulative

    settings = load_settings({"dsn": "host=/nowhere"}, env={})
    providers = ProviderFamilies(settings.providers)
    labels = LabelGuard(settings)
    labels.weigh_layer("Forge", 1.0)
    labels.decide()

    class FailingPrices(PriceBook):
        """The real price book, but for one model while ``failing``."""

        failing = False

        def price(self, family: str, ref: str | None, period: datetime | None) -> Any:
            if self.failing and ref is not None and "opus" in ref:
                raise RuntimeError("price lookup failed")
            return super().price(family, ref, period)

    prices = FailingPrices(settings.providers, settings.prices, providers.family)
    models = ["claude-sonnet-4", "claude-opus-4", "claude-haiku-4", "gpt-5", "glm-4.6"]
    totals = {
        Key(f"q{i % 2}", "Forge", "anthropic", model, None, None, None): Sums(
            *(Decimal(i * 10 + j) for j in range(7))
        )
        for i, model in enumerate(models)
    }
    counters = Counters()
    assert counters.series(totals, labels, providers.family, prices) == cumulative(
        totals, labels, providers.family, prices
    )
    more = Sums(*(Decimal(1) for _ in range(7)))
    changed = dict(totals)
    for key in list(changed)[:2]:  # sonnet, then opus: fewer than half the keys
        changed[key] = changed[key] + more
    prices.failing = True
    with pytest.raises(RuntimeError):
        counters.series(changed, labels, providers.family, prices)
    prices.failing = False
    expected = cumulative(changed, labels, providers.family, prices)
    assert counters.series(changed, labels, providers.family, prices) == expected
    assert expected != cumulative(totals, labels, providers.family, prices)


def test_sums_keep_every_count_exact_whole_or_not() -> None:
    """Counts are ints when whole (the sum of an integer column, however large) and the
    exact Decimal when not (a numeric column with a fraction); NULLs add nothing."""
    row = SimpleNamespace(
        calls=3,
        cost=Decimal("0.10"),
        input_tokens=Decimal(2**70 + 1),
        output_tokens=Decimal("2.5"),
        cache_read_tokens=None,
        cache_write_tokens=Decimal(0),
    )
    single = Sums.of(row)
    assert single == (3, Decimal("0.10"), 2**70 + 1, Decimal("2.5"), 0, 0, 0)
    assert [type(v) for v in single] == [int, Decimal, int, Decimal, int, int, int]
    # mypy reads + on a named tuple as concatenation, whatever __add__ says.
    double = single + single
    assert double == (6, Decimal("0.20"), 2**71 + 2, Decimal(5), 0, 0, 0)  # type: ignore[comparison-overlap]
    assert double - single == single  # type: ignore[operator]


def test_every_whole_ledger_read_shares_the_label_strings_of_the_last(dsn: str) -> None:
    """A reconciliation's running sums hold the same string objects as the sums they replace
    (one per distinct label value), not a copy per row: their memory is not held twice."""
    refresher = Refresher(load_settings({"dsn": dsn, "reconcile_interval_seconds": 0}, env={}))
    with psycopg.connect(dsn, autocommit=True) as writer:
        _insert(writer, _rows(random.Random(7), 200))
    _families(refresher)
    before = refresher.source(SpendSource).totals.totals
    _families(refresher)  # every refresh reads the whole ledger again
    after = refresher.source(SpendSource).totals.totals
    assert after is not before and after.keys() == before.keys()
    firsts = {key: key for key in before}
    pairs = [
        (old, new)
        for key in after
        for old, new in zip(firsts[key], key, strict=True)
        if isinstance(new, str)
    ]
    assert len(pairs) >= 3 * len(after)  # quest, layer and provider at least
    assert all(old is new for old, new in pairs)
    refresher.close()


def test_a_whole_ledger_read_folds_its_rows_as_they_arrive(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spend read folds its rows a few hundred at a time: it never holds the whole result,
    which a reconciliation held on top of the sums it replaces (at 10 M rows in the window the
    served exporter's peak RSS 111.5 to 112.1 MiB with them, 109.2 and 109.3 without)."""
    calls = [
        (NOW - timedelta(hours=1), f"t{n}", f"q{n % 5}", "Forge", "bedrock/x", f"m-{n}", 10, 5, 1)
        for n in range(6000)
    ]
    with psycopg.connect(dsn, autocommit=True) as writer:
        writer.cursor().executemany(
            "INSERT INTO cost_ledger (ts, task_id, quest, layer, provider, model, input_tokens,"
            " output_tokens, cost_usd) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            calls,
        )
    seen: dict[str, int] = {}
    read = SpendSource.read

    def measured(self: SpendSource, query: str, cur: psycopg.Cursor[Any], refresh: Any) -> None:
        if query != SPEND_TOTALS.name:
            return read(self, query, cur, refresh)
        tracemalloc.start()
        try:
            read(self, query, cur, refresh)
            held, peak = tracemalloc.get_traced_memory()
            # What holding the same rows costs (the read's own statement and loaders).
            statement = self.statement(query, refresh)
            rows = cur.execute(statement.sql, statement.params).fetchall()
            seen["rows"] = tracemalloc.get_traced_memory()[0] - held
            seen["groups"] = len(rows)
        finally:
            tracemalloc.stop()
        seen["transient"] = peak - held
        return None

    monkeypatch.setattr(SpendSource, "read", measured)
    refresher = Refresher(load_settings({"dsn": dsn, "reconcile_interval_seconds": 0}, env={}))
    _families(refresher)
    refresher.close()
    assert seen["groups"] > 6000  # each model's sums, and the largest id
    # Streamed about a quarter of what the rows take (the running sums' tables grow as they
    # fold); held, more than four fifths.
    assert seen["transient"] < seen["rows"] / 2, seen
