"""A deterministic, realistic synthetic ledger, loaded with COPY.

Shapes that matter for the dashboards are deliberate: 30 quests with Zipf-skewed budgets, five
layers, the platform's provider strings plus unknown ones, heavy-tailed task sizes, zero-cost
subscription calls, tasks that are still running or were never measured, and wasteful tasks.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple, TextIO

import psycopg

from exporter.contract import schema_sql

LAYERS = ("Agora", "Exchange", "Forge", "Atlas", "Senate")
LAYER_WEIGHTS = (0.25, 0.15, 0.35, 0.15, 0.10)

_TOPICS = (
    "protein-folding",
    "drug-repurposing",
    "crispr-screens",
    "climate-models",
    "battery-cathodes",
    "dark-matter",
    "sepsis-biomarkers",
    "gut-microbiome",
    "alzheimers-tau",
    "perovskite-cells",
    "fusion-plasma",
    "antibiotic-discovery",
    "quantum-error",
    "soil-carbon",
    "malaria-vaccine",
    "exoplanet-atmos",
    "graphene-membranes",
    "cancer-neoantigens",
    "ocean-acidification",
    "enzyme-design",
    "long-covid",
    "room-temp-superconductors",
    "coral-bleaching",
    "mrna-stability",
    "wildfire-spread",
    "parkinsons-alpha-syn",
    "catalyst-screening",
    "sleep-genetics",
    "seismic-forecast",
    "photosynthesis-boost",
)


class Profile(NamedTuple):
    """How the platform calls one provider: its strings, share of calls, prices and caching."""

    raw: str
    model: str | None
    weight: float
    usd_in: float  # per 1M fresh input tokens (cache reads cost a tenth, writes 1.25x)
    usd_out: float  # per 1M output tokens
    cached: float  # share of the input served from the prompt cache
    reasoning: float  # share of the output spent on reasoning


# Subscription plans (max, codex) log cost 0 with real tokens. Models the price catalogue does
# not know (or families without a price provider) show up as unpriced.
PROVIDERS: tuple[Profile, ...] = (
    Profile("max/claude-opus-4", "claude-opus-4", 0.12, 0.0, 0.0, 0.7, 0.2),
    Profile("max/claude-sonnet-4", "claude-sonnet-4", 0.10, 0.0, 0.0, 0.7, 0.2),
    Profile("codex:gpt-5-codex", "gpt-5-codex", 0.12, 0.0, 0.0, 0.5, 0.4),
    Profile(
        "bedrock/us.anthropic.claude-sonnet-4",
        "us.anthropic.claude-sonnet-4-20250514-v1:0",
        0.22,
        3.0,
        15.0,
        0.6,
        0.1,
    ),
    Profile(
        "bedrock/us.anthropic.claude-opus-4",
        "us.anthropic.claude-opus-4-20250514-v1:0",
        0.06,
        15.0,
        75.0,
        0.6,
        0.1,
    ),
    Profile("MiniMax-M2", "MiniMax-M2", 0.14, 0.3, 1.2, 0.3, 0.3),
    Profile("glm-4.6", "glm-4.6", 0.12, 0.6, 2.2, 0.2, 0.2),
    Profile("openrouter/deepseek-v3.1", "deepseek-v3.1", 0.05, 0.27, 1.1, 0.0, 0.3),
    Profile("local/llama-3.1-70b", "llama-3.1-70b", 0.04, 0.05, 0.05, 0.0, 0.0),
    Profile("together:qwen3-coder", None, 0.03, 0.4, 1.6, 0.0, 0.0),
)


class CostRow(NamedTuple):
    """One generated cost_ledger row, in COPY_COST's column order."""

    ts: datetime
    task_id: str
    quest: str
    layer: str
    provider: str
    model: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: float


def call(
    rng: random.Random, ts: datetime, t: Task, profile: Profile, scale: float = 1.0
) -> CostRow:
    """One call of a task: tokens drawn for the provider's profile, cost at its prices."""
    total_in = int(rng.lognormvariate(8.0, 1.0) * scale)
    output = int(rng.lognormvariate(6.5, 1.1) * scale)
    cache_read = int(total_in * profile.cached * rng.uniform(0.5, 1.0))
    cache_write = int((total_in - cache_read) * 0.1) if profile.cached else 0
    fresh = total_in - cache_read - cache_write
    usd = (
        fresh * profile.usd_in
        + cache_read * profile.usd_in * 0.1
        + cache_write * profile.usd_in * 1.25
        + output * profile.usd_out
    )
    return CostRow(
        ts,
        t.task_id,
        t.quest,
        t.layer,
        profile.raw,
        profile.model,
        fresh,
        output,
        cache_read,
        cache_write,
        int(output * profile.reasoning),
        round(usd / 1e6, 6),
    )


MIN_DAILY_BUDGET_USD = 5.0
COPY_COST = (
    "COPY cost_ledger (ts, task_id, quest, layer, provider, model, input_tokens, output_tokens,"
    " cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_usd) FROM STDIN"
)


@dataclass(frozen=True)
class Quest:
    name: str
    weight: float


@dataclass
class Task:
    task_id: str
    quest: str
    layer: str
    providers: list[int]
    start: datetime
    calls: int
    wasteful: bool
    last_ts: datetime | None = None
    cost: float = 0.0
    tokens: int = 0


TASK_IDS = ("short", "uuid")
"""Shapes of generated task ids: ``t-<seed>-<n>`` (11 characters), or a canonical UUID made
from it (as a platform whose task ids are UUIDs writes them; the task store packs these)."""


@dataclass
class LedgerPlan:
    """What one seeded generation will produce."""

    seed: int
    rows: int
    end: datetime
    days: int
    quests: list[Quest] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    task_ids: str = "short"  # one of TASK_IDS

    def task_id(self, name: str) -> str:
        """The id of the task named ``name`` in this plan's shape of ids."""
        if self.task_ids == "short":
            return name
        digest = hashlib.md5(name.encode(), usedforsecurity=False).digest()
        return str(uuid.UUID(bytes=digest, version=4))


def plan(
    rows: int,
    *,
    seed: int = 7,
    end: datetime | None = None,
    days: int = 30,
    task_ids: str = "short",
) -> LedgerPlan:
    """Decide quests and tasks (and their call counts, summing to ``rows``)."""
    if task_ids not in TASK_IDS:
        raise ValueError(f"task_ids must be one of {', '.join(TASK_IDS)}, not {task_ids!r}")
    rng = random.Random(seed)
    end = (end or datetime.now(UTC)).astimezone(UTC)
    quests = [Quest(f"q-{topic}", 1.0 / (i + 1) ** 1.1) for i, topic in enumerate(_TOPICS)]
    weights = [q.weight for q in quests]
    p = LedgerPlan(seed=seed, rows=rows, end=end, days=days, quests=quests, task_ids=task_ids)
    remaining, n = rows, 0
    span = days * 86400.0
    while remaining > 0:
        # Heavy tail: most tasks make a handful of calls, a few make hundreds.
        calls = min(remaining, max(1, int(rng.paretovariate(1.3) * 6)))
        quest = rng.choices(quests, weights)[0].name
        primary = rng.choices(range(len(PROVIDERS)), [x.weight for x in PROVIDERS])[0]
        providers = [primary] if rng.random() < 0.8 else [primary, rng.randrange(len(PROVIDERS))]
        layer = rng.choices(LAYERS, LAYER_WEIGHTS)[0]
        left = rng.random() * span
        # A task still running at ``end`` has made only the calls that fit so far (~90 s apart):
        # without this cap a long ledger piled a heavy-tailed task's later calls onto ``end``.
        calls = min(calls, max(1, int(left / 90)))
        p.tasks.append(
            Task(
                task_id=p.task_id(f"t-{seed}-{n:07d}"),
                quest=quest,
                layer=layer,
                providers=providers,
                start=end - timedelta(seconds=left),
                calls=calls,
                wasteful=rng.random() < 0.12,
            )
        )
        remaining -= calls
        n += 1
    return p


def cost_rows(p: LedgerPlan) -> Iterator[CostRow]:
    """Yield the rows of the cost ledger in time order.

    A real ledger is appended as calls happen, so its physical order follows ``ts``, which the
    planner counts on for window scans. Tasks overlap in time: a sweep keeps a heap of the tasks
    under way (memory follows concurrency, not ledger size) and emits their calls merged.
    """
    order = sorted(range(len(p.tasks)), key=lambda i: (p.tasks[i].start, i))
    heap: list[tuple[datetime, int, CostRow, Iterator[CostRow]]] = []
    admitted = 0
    while admitted < len(order) or heap:
        # A task starting before the earliest pending call may have an earlier call itself.
        while admitted < len(order) and (not heap or p.tasks[order[admitted]].start <= heap[0][0]):
            index = order[admitted]
            calls = _task_calls(p, index)
            first = next(calls, None)
            if first is not None:
                heapq.heappush(heap, (first[0], index, first, calls))
            admitted += 1
        _, index, row, calls = heapq.heappop(heap)
        yield row
        following = next(calls, None)
        if following is not None:
            heapq.heappush(heap, (following[0], index, following, calls))


def _task_calls(p: LedgerPlan, index: int) -> Iterator[CostRow]:
    """One task's calls; its own random stream keeps the ledger deterministic in any order."""
    t = p.tasks[index]
    rng = random.Random(p.seed * 1_000_003 + index)
    ts = t.start
    scale = 4.0 if t.wasteful else 1.0
    for _ in range(t.calls):
        ts = min(ts + timedelta(seconds=rng.expovariate(1 / 90)), p.end)
        row = call(rng, ts, t, PROVIDERS[rng.choice(t.providers)], scale)
        t.last_ts, t.cost = ts, t.cost + row.cost_usd
        t.tokens += row.input_tokens + row.output_tokens
        yield row


def impact_rows(p: LedgerPlan) -> Iterator[tuple[Any, ...]]:
    """Yield (task_id, title, quest, layer, impact_score, measured_at) for measured tasks.

    Call after ``cost_rows`` has been consumed: recent tasks are still running (no row).
    """
    rng = random.Random(p.seed + 2)
    for t in p.tasks:
        if t.last_ts is None or t.last_ts > p.end - timedelta(hours=4) or rng.random() < 0.2:
            continue  # still running, or never measured
        if rng.random() < 0.05:
            score = None  # measurement pending
        elif t.wasteful:
            score = round(rng.random() * 0.5, 4)
        else:
            score = round(rng.lognormvariate(0.3, 1.0), 4)
        title = f"{t.quest.removeprefix('q-').replace('-', ' ')} #{t.task_id[-5:]}"
        yield (t.task_id, title, t.quest, t.layer, score, t.last_ts + timedelta(minutes=30))


def budget_rows(p: LedgerPlan) -> Iterator[tuple[str, date, float]]:
    """Yield (quest, day, allocated_usd) for every quest and day of the ledger, today included.

    Budgets follow each quest's generated spend with a quest-specific slack between 0.6x and
    1.5x, so some quests run over budget and others leave money on the table. Call after
    ``cost_rows`` has been consumed.
    """
    rng = random.Random(p.seed + 3)
    spend: dict[str, float] = {q.name: 0.0 for q in p.quests}
    for t in p.tasks:
        spend[t.quest] += t.cost
    last = p.end.date()
    for q in p.quests:
        base = max(MIN_DAILY_BUDGET_USD, spend[q.name] / max(p.days, 1) * rng.uniform(0.6, 1.5))
        for d in range(p.days + 1):
            day = last - timedelta(days=p.days - d)
            yield (q.name, day, round(base * rng.uniform(0.9, 1.1), 2))


def create_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the contract's tables and indexes if they do not exist."""
    conn.execute(schema_sql())


def has_rows(conn: psycopg.Connection[Any]) -> bool:
    """Create the schema if needed and return True if cost_ledger holds at least one row."""
    create_schema(conn)
    return conn.execute("SELECT EXISTS (SELECT 1 FROM cost_ledger)").fetchone() == (True,)


class Progress:
    """A progress bar on a terminal; a line every 10% otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, label: str = "rows") -> None:
        self.total, self.stream, self.label = total, stream, label
        self.tty = stream.isatty()
        self._shown = -1

    def update(self, done: int) -> None:
        pct = int(100 * done / self.total) if self.total else 100
        step = pct if self.tty else pct // 10 * 10
        if step == self._shown:
            return
        self._shown = step
        bar = "#" * (pct // 4)
        end = "\r" if self.tty and done < self.total else "\n"
        self.stream.write(f"[{bar:<25}] {pct:3d}% {done:,}/{self.total:,} {self.label}{end}")
        self.stream.flush()


def _text(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def load(
    conn: psycopg.Connection[Any],
    rows: int,
    *,
    seed: int = 7,
    end: datetime | None = None,
    days: int = 30,
    progress: Callable[[int], None] | None = None,
    task_ids: str = "short",
) -> LedgerPlan:
    """Create the schema and load a generated ledger with ``rows`` cost rows, in one transaction."""
    p = plan(rows, seed=seed, end=end, days=days, task_ids=task_ids)
    with conn.transaction(), conn.cursor() as cur:
        create_schema(conn)
        with cur.copy(COPY_COST) as copy:
            chunk: list[str] = []
            for i, row in enumerate(cost_rows(p), 1):
                chunk.append("\t".join(map(_text, row)))
                if len(chunk) == 20000:
                    copy.write("\n".join(chunk) + "\n")
                    chunk.clear()
                    if progress:
                        progress(i)
            if chunk:
                copy.write("\n".join(chunk) + "\n")
        if progress:
            progress(rows)
        with cur.copy(
            "COPY impact_ledger (task_id, title, quest, layer, impact_score,"
            " measured_at) FROM STDIN"
        ) as copy:
            for impact in impact_rows(p):
                copy.write_row(impact)
        cur.executemany(
            "INSERT INTO quest_budget_allocations (quest, day, allocated_usd) VALUES (%s, %s, %s)"
            " ON CONFLICT (quest, day) DO UPDATE SET allocated_usd = EXCLUDED.allocated_usd",
            list(budget_rows(p)),
        )
    conn.execute("ANALYZE cost_ledger")
    conn.execute("ANALYZE impact_ledger")
    return p


class LiveTraffic:
    """Append new spend to a loaded ledger so the demo's numbers move."""

    CALLS = 25
    """Rows an :meth:`append` writes."""

    def __init__(self, p: LedgerPlan, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        self.plan = p
        self.active: list[Task] = []
        self.serial = 0

    def batch(self, now: datetime, calls: int = CALLS) -> list[CostRow]:
        """Return ``calls`` rows at ``now``: some tasks continue, some start."""
        rng, out = self.rng, []
        weights = [q.weight for q in self.plan.quests]
        for _ in range(calls):
            if not self.active or rng.random() < 0.15:
                self.serial += 1
                self.active.append(
                    Task(
                        task_id=self.plan.task_id(f"live-{self.plan.seed}-{self.serial:06d}"),
                        quest=rng.choices(self.plan.quests, weights)[0].name,
                        layer=rng.choices(LAYERS, LAYER_WEIGHTS)[0],
                        providers=[
                            rng.choices(range(len(PROVIDERS)), [x.weight for x in PROVIDERS])[0]
                        ],
                        start=now,
                        calls=0,
                        wasteful=False,
                    )
                )
                self.active = self.active[-30:]
            t = rng.choice(self.active)
            out.append(call(rng, now, t, PROVIDERS[t.providers[0]]))
        return out

    def append(self, conn: psycopg.Connection[Any], now: datetime) -> int:
        rows = self.batch(now)
        with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_COST) as copy:
            for row in rows:
                copy.write_row(row)
        return len(rows)
