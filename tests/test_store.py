"""The compact task store holds what a dict of Task objects holds, whatever is folded, dropped
and refiled in it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.store import id_shapes, measure
from exporter.store import Task, TaskStore, micros

UUID = "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9"
TASK_IDS = [f"t{i}" for i in range(40)] + ["", "tâche-é", "a\u3000b", "t1 ", "T1"]
# Canonical UUIDs, which the store packs (zero and 0xff bytes in them), and ids that look like
# one but are not canonical, which it keeps as text: each must read back as it was written.
TASK_IDS += [
    UUID,
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    UUID.upper(),
    "{" + UUID + "}",
    UUID + "x",
    UUID[:-1],
    UUID.replace("-", ""),
    UUID[:11] + " " + UUID[12:],  # fromhex skips spaces: an odd count of digits
    UUID[:11] + "  " + UUID[13:],  # and here 15 bytes
    UUID[:8] + "-4e5f-4071-8293-a4b5c6d7e8fg",
    UUID[:7] + "-" + UUID[8:],  # a hyphen too many
]
IDS = st.sampled_from(TASK_IDS)
FAMILIES = st.sampled_from(["anthropic", "openai", "max", "glm"])
LABELS = st.sampled_from([None, "q-a", "q-b", "Forge", "Agora"])
START = datetime(2026, 11, 1, tzinfo=UTC)
TIMES = st.integers(0, 10 * 24 * 3600).map(
    lambda s: micros(START + timedelta(seconds=s, microseconds=7))
)
AMOUNTS = st.one_of(
    st.integers(0, 10**15),
    st.integers(2**62, 2**64),  # past int64 once summed
    st.sampled_from([Decimal("0.5"), Decimal("1E-3")]),  # finer than the integers
)
TOKENS = st.one_of(st.integers(0, 10**6), st.integers(2**30, 2**62))  # past int32, int64
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), IDS, FAMILIES, AMOUNTS, TOKENS, AMOUNTS),
        st.tuples(st.just("label"), IDS, TIMES, LABELS, LABELS),
        st.tuples(st.just("pop"), IDS),
        st.tuples(st.just("impact"), IDS, st.one_of(st.none(), st.floats(-5, 5))),
        st.tuples(st.just("ensure"), IDS),
    ),
    max_size=150,
)


def _fields(task: Task | None) -> tuple[object, ...] | None:
    if task is None:
        return None
    return (
        task.cost,
        task.tokens,
        task.listed,
        task.last_us,
        task.quest,
        task.layer,
        sorted((f, c, t, li) for f, c, t, li in task.by_family()),
    )


def _apply(
    op: tuple[object, ...], store: TaskStore, tasks: dict[str, Task], impacts: dict[str, float]
) -> None:
    """One of OPS, on the store and on Task objects (and their impacts) alike."""
    name, task_id, *args = op
    assert isinstance(task_id, str)
    if name == "add":
        store.add(task_id, *args)  # type: ignore[arg-type]
        tasks.setdefault(task_id, Task()).add(*args)  # type: ignore[arg-type]
    elif name == "label":
        store.label(task_id, *args)  # type: ignore[arg-type]
        tasks.setdefault(task_id, Task()).label(*args)  # type: ignore[arg-type]
    elif name == "pop":
        store.pop(task_id)
        tasks.pop(task_id, None)
        impacts.pop(task_id, None)
    elif name == "ensure":
        store.ensure(task_id)
        tasks.setdefault(task_id, Task())
    else:
        (impact,) = args
        store.set_impact(task_id, impact)  # type: ignore[arg-type]
        tasks.setdefault(task_id, Task())
        if impact is None:
            impacts.pop(task_id, None)
        else:
            impacts[task_id] = impact  # type: ignore[assignment]


@settings(max_examples=1000)
@given(OPS, TIMES, TIMES, st.integers(0, 60))
def test_the_store_holds_what_task_objects_hold(
    ops: list[tuple[object, ...]], low: int, high: int, expected: int
) -> None:
    store = TaskStore(expected)  # however many it was told to expect
    tasks: dict[str, Task] = {}
    impacts: dict[str, float] = {}
    for op in ops:
        _apply(op, store, tasks, impacts)
    assert len(store) == len(tasks)
    assert sorted(store) == sorted(tasks)
    assert sorted((k, _fields(t), i) for k, t, i in store.items()) == sorted(
        (k, _fields(t), impacts.get(k)) for k, t in tasks.items()
    )
    for task_id in TASK_IDS:
        assert (task_id in store) == (task_id in tasks)
        assert _fields(store.get(task_id)) == _fields(tasks.get(task_id)), task_id
        assert store.impact(task_id) == impacts.get(task_id)
    low, high = sorted((low, high))
    in_span = {k for k, t in tasks.items() if t.last_us is not None and low <= t.last_us < high}
    assert sorted(store.within(low, high)) == sorted(in_span)
    before = {k for k, t in tasks.items() if t.last_us is not None and t.last_us < high}
    assert sorted(store.within(None, high)) == sorted(before)


@settings(max_examples=500)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("add"), st.sampled_from(["t0", "t1"]), FAMILIES, AMOUNTS, TOKENS, AMOUNTS
            ),
            st.tuples(st.just("pop"), st.sampled_from(["t0", "t1"])),
        ),
        max_size=40,
    )
)
def test_a_task_s_families_in_any_order(ops: list[tuple[object, ...]]) -> None:
    """A task that used several families holds a row for each but its first, whose sums are
    the task's totals less the rows': every family's sums read back as Task objects add them,
    however the families interleave (the first again after others), and after a task is
    dropped and its rows reused by another."""
    store = TaskStore()
    tasks: dict[str, Task] = {}
    for op in ops:
        _apply(op, store, tasks, {})
        for held in ("t0", "t1"):
            assert _fields(store.get(held)) == _fields(tasks.get(held)), (op, held)


@pytest.mark.parametrize("expected", [0, 5000])
def test_many_tasks_come_and_go(expected: int) -> None:
    """Past the first index sizes (or sized for them all), with most tasks dropped and their
    slots reused."""
    store = TaskStore(expected)
    for n in range(5000):
        store.add(f"task-{n}", "anthropic", n, 1, 0)
        if n % 3:
            store.pop(f"task-{n - 1}")
    held = {f"task-{n}" for n in range(5000) if (n + 1) % 3 == 0} | {"task-4999"}
    assert set(store) == held and len(store) == len(held)
    got = store.get("task-2")
    assert got is not None and (got.cost, got.family) == (2, "anthropic")


def test_an_index_grows_by_doubling_but_not_while_tasks_come_and_go() -> None:
    """A store growing from empty doubles its index (few rehashes); one whose tasks are
    replaced keeps it at about twice its tasks, however often it drops the entries of the
    tasks gone."""
    store = TaskStore()
    sizes = set()
    for n in range(10_000):
        store.ensure(f"task-{n}")
        sizes.add(len(store._index))
    assert len(sizes) <= 12  # 8 entries doubled up to 10,000 tasks: 12 sizes (1.4x: 22)
    store = TaskStore(1000)
    for n in range(1000):
        store.ensure(f"task-{n}")
    for n in range(1000, 30_000, 2):  # two in, then two out: 1,000 to 1,002 tasks held
        store.ensure(f"task-{n}")
        store.ensure(f"task-{n + 1}")
        store.pop(f"task-{n - 1000}")
        store.pop(f"task-{n - 999}")
        assert len(store._index) <= 2 * 1002 + 2
    assert len(store) == 1000


def test_more_distinct_labels_than_two_byte_codes() -> None:
    """Label codes start at two bytes and widen, keeping every label, past 65,535 values."""
    store = TaskStore()
    for n in range(70_000):
        store.label(f"task-{n}", n, f"quest-{n}", "Forge" if n % 2 else f"layer-{n}")
    for n in (0, 1, 65_000, 65_535, 65_536, 69_999):
        got = store.get(f"task-{n}")
        assert got is not None
        assert (got.quest, got.layer) == (f"quest-{n}", "Forge" if n % 2 else f"layer-{n}")


def test_a_uuid_is_held_in_17_bytes_and_every_id_reads_back_as_written() -> None:
    """A canonical UUID costs 17 bytes of the id blob instead of 37; packed or not, every id
    is found and reads back as it was written, also after the index grew around it."""
    store = TaskStore()
    store.ensure(UUID)
    assert len(store._blob) == 17
    store.ensure("t-7-0421704")
    assert len(store._blob) == 17 + 12
    many = [str(uuid.UUID(int=n * 2**64 + n)) for n in range(3000)]  # NUL bytes in most
    for task_id in [*TASK_IDS, *many]:
        store.ensure(task_id)
    held = {*TASK_IDS, *many, "t-7-0421704"}
    assert sorted(store) == sorted(held) and len(store) == len(held)
    assert all(task_id in store for task_id in held)
    assert UUID.upper() in store and UUID.replace("0a", "0A", 1) not in store


def test_the_store_benchmark_sees_uuids_packed() -> None:
    """bench.store's measurement (tracemalloc's, not the store's own accounting): a canonical
    UUID's id takes 17 bytes, its uppercase form (held as text) 37 and the benchmark's
    11-character ids 12, each plus the blob's spare room as it grows (up to an eighth)."""
    shapes = {name: measure(ids, runs=1).bytes_per_task for name, ids in id_shapes(3000).items()}
    short, packed, text = (shapes[k] for k in ("11 characters", "UUID", "UUID, uppercase"))
    assert 37 - 17 * 1.13 <= text - packed <= 37 * 1.13 - 17
    assert 17 - 12 * 1.13 <= packed - short <= 17 * 1.13 - 12
