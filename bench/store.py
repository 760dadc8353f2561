"""The window's task store by the shape of its task ids, side by side in one run.

    python -m bench.store [--tasks 430000] [--runs 3]

Fills a ``TaskStore`` as a rebuild does (each task's sums, then each task's labels and
impact) with as many tasks as 10 M rows in the window hold, for each shape of id: the benchmark
ledger's (11 characters), canonical UUIDs (which the store packs into 16 bytes), and the same
UUIDs in uppercase (not canonical: held as text). Prints, per shape, the bytes a task costs
(what ``tracemalloc`` sees the store allocate, divided by its tasks) and the median time to
fill it and to list its ids, with each shape's bytes against the short ids'. No database.
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from exporter.store import TaskStore

HOUR_US = 3_600_000_000
START_US = 1_780_000_000_000_000
T = TypeVar("T")


class Shape(NamedTuple):
    bytes_per_task: float
    fill_seconds: float
    list_seconds: float


def id_shapes(tasks: int, seed: int = 1) -> dict[str, list[str]]:
    rng = random.Random(seed)
    uuids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(tasks)]
    return {
        "11 characters": [f"t-7-{n:07d}" for n in range(tasks)],
        "UUID": uuids,
        "UUID, uppercase": [u.upper() for u in uuids],
    }


def fill(ids: list[str]) -> TaskStore:
    """As a rebuild folds the window query: every task's sums, then every task's labels and
    impact (its two branches), so each task is found twice."""
    store = TaskStore()
    for n, task_id in enumerate(ids):
        store.add(task_id, "anthropic", 1000 + n, 50, 0)
    for n, task_id in enumerate(ids):
        store.label(task_id, START_US + n * (720 * HOUR_US // len(ids)), "q-a", "Forge")
        store.set_impact(task_id, 0.5)
    return store


def timed(work: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    out = work()
    return time.perf_counter() - started, out


def measure(ids: list[str], runs: int) -> Shape:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = fill(ids)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del store
    fills, lists = [], []
    for _ in range(runs):
        gc.collect()
        seconds, store = timed(lambda: fill(ids))
        fills.append(seconds)
        lists.append(timed(functools.partial(list, store))[0])
        del store
    return Shape(held / len(ids), statistics.median(fills), statistics.median(lists))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=430_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    results = {name: measure(ids, args.runs) for name, ids in id_shapes(args.tasks).items()}
    base = next(iter(results.values())).bytes_per_task
    print(f"\n{args.tasks:,} tasks, medians of {args.runs} runs\n")
    print("| task ids | bytes a task | against 11 characters | fill | list the ids |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r.bytes_per_task:.1f} | {r.bytes_per_task / base:.2f} | "
            f"{r.fill_seconds:.2f} s | {r.list_seconds:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
