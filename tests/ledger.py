"""Test ledgers: rows to insert, and a reference model of every ledger family.

The reference model re-derives each metric from the rows in plain Python, written from the
metric contract and not from the exporter's code, so the two can disagree.
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from importlib.metadata import version as _version
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

# Provider strings the tests use, with the family the default rules must give them.
FAMILY_OF = {
    "max/claude-opus-4": "max",
    "max/claude-sonnet-4": "max",
    "MAX/Claude-Opus-4": "max",
    "codex:gpt-5-codex": "codex",
    "codex:gpt-5.6-luna": "codex",
    "bedrock/us.anthropic.claude-sonnet-4": "bedrock",
    "bedrock/us.anthropic.claude-opus-4": "bedrock",
    "MiniMax-M2": "minimax",
    "minimax/abab7": "minimax",
    "glm-4.6": "glm",
    "zhipu/glm-4.5-air": "glm",
    "openrouter/deepseek-v3.1": "other",
    "local/llama-3.1-70b": "other",
    "together:qwen3-coder": "other",
    "maximal-model": "other",
}
FAMILIES = ("bedrock", "codex", "minimax", "glm", "max", "other")
# The genai-prices provider whose list prices apply to each family by default.
PRICE_PROVIDER = {
    "bedrock": "aws",
    "codex": "openai",
    "minimax": "minimax",
    "glm": "zai",
    "max": "anthropic",
}
# The model label of each raw provider string (model column NULL), and of model column values.
MODEL_OF = {
    "max/claude-opus-4": "claude-opus-4",
    "max/claude-sonnet-4": "claude-sonnet-4",
    "MAX/Claude-Opus-4": "claude-opus-4",
    "codex:gpt-5-codex": "gpt-5-codex",
    "codex:gpt-5.6-luna": "gpt-5.6-luna",
    "bedrock/us.anthropic.claude-sonnet-4": "claude-sonnet-4",
    "bedrock/us.anthropic.claude-opus-4": "claude-opus-4",
    "MiniMax-M2": "minimax-m2",
    "minimax/abab7": "abab7",
    "glm-4.6": "glm-4.6",
    "zhipu/glm-4.5-air": "glm-4.5-air",
    "openrouter/deepseek-v3.1": "deepseek-v3.1",
    "local/llama-3.1-70b": "llama-3.1-70b",
    "together:qwen3-coder": "qwen3-coder",
    "maximal-model": "maximal-model",
    # model column values
    "claude-opus-4": "claude-opus-4",
    "claude-sonnet-4": "claude-sonnet-4",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5",
    "us.anthropic.claude-sonnet-4-20250514-v1:0": "claude-sonnet-4",
    "us.anthropic.claude-opus-4-20250514-v1:0": "claude-opus-4",
    "gpt-5-codex": "gpt-5-codex",
    "deepseek-v3.1": "deepseek-v3.1",
    "llama-3.1-70b": "llama-3.1-70b",
}


Tokens = int | Decimal
"""A token count: a numeric column's may have a fraction."""


@dataclass
class Call:
    """One cost_ledger row."""

    ts: datetime | None
    task_id: str | None
    quest: str | None = "q-a"
    layer: str | None = "Forge"
    provider: str | None = "bedrock/us.anthropic.claude-sonnet-4"
    input_tokens: Tokens | None = 100
    output_tokens: Tokens | None = 50
    cost_usd: Decimal | None = Decimal("1")
    model: str | None = None
    cache_read_tokens: Tokens | None = None
    cache_write_tokens: Tokens | None = None
    reasoning_tokens: Tokens | None = None

    def ref(self) -> str | None:
        """What the call names as its model: the model column, else the provider's tail."""
        if self.model:
            return self.model.lower()
        if not self.provider:
            return None
        raw = self.provider.lower()
        if "/" in raw:
            return raw.split("/", 1)[1]
        head, sep, tail = raw.partition(":")
        return tail if sep and head.isalnum() else raw

    def model_label(self) -> str:
        if self.model is None and self.provider is None:
            return "unknown"
        return MODEL_OF[self.model if self.model is not None else self.provider]  # type: ignore[index]

    def categories(self) -> dict[str, Tokens]:
        """Tokens by the ``direction`` label (disjoint)."""
        return {
            "input": self.input_tokens or 0,
            "output": self.output_tokens or 0,
            "cache_read": self.cache_read_tokens or 0,
            "cache_write": self.cache_write_tokens or 0,
        }


@dataclass
class Impact:
    """One impact_ledger row."""

    task_id: str
    impact_score: float | None
    measured_at: datetime | None = None
    quest: str | None = None
    layer: str | None = None
    title: str | None = None


@dataclass
class Budget:
    """One quest_budget_allocations row."""

    quest: str
    day: date
    allocated_usd: Decimal | None


def from_plan(plan: Any) -> tuple[list[Call], list[Impact], list[Budget]]:
    """The rows of a generated ledger (exporter.generate), as test rows."""
    from exporter import generate

    calls = [
        Call(
            ts=ts,
            task_id=t,
            quest=q,
            layer=la,
            provider=p,
            model=m,
            input_tokens=i,
            output_tokens=o,
            cache_read_tokens=cr,
            cache_write_tokens=cw,
            reasoning_tokens=r,
            cost_usd=Decimal(str(c)),
        )
        for ts, t, q, la, p, m, i, o, cr, cw, r, c in generate.cost_rows(plan)
    ]
    impacts = [
        Impact(task_id=t, title=ti, quest=q, layer=la, impact_score=s, measured_at=at)
        for t, ti, q, la, s, at in generate.impact_rows(plan)
    ]
    budgets = [Budget(q, d, Decimal(str(a))) for q, d, a in generate.budget_rows(plan)]
    return calls, impacts, budgets


def relax(dsn: str) -> None:
    """Drop NOT NULL and the impact primary key, as a user's view might have none of them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for col in (
            "ts",
            "task_id",
            "quest",
            "layer",
            "provider",
            "input_tokens",
            "output_tokens",
            "cost_usd",
        ):
            conn.execute(f"ALTER TABLE cost_ledger ALTER COLUMN {col} DROP NOT NULL")
        conn.execute("ALTER TABLE impact_ledger DROP CONSTRAINT impact_ledger_pkey")


def insert(
    dsn: str,
    calls: Sequence[Call],
    impacts: Sequence[Impact] = (),
    budgets: Sequence[Budget] = (),
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO cost_ledger (ts, task_id, quest, layer, provider, model, input_tokens,"
            " output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cost_usd)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    c.ts,
                    c.task_id,
                    c.quest,
                    c.layer,
                    c.provider,
                    c.model,
                    c.input_tokens,
                    c.output_tokens,
                    c.cache_read_tokens,
                    c.cache_write_tokens,
                    c.reasoning_tokens,
                    c.cost_usd,
                )
                for c in calls
            ],
        )
        cur.executemany(
            "INSERT INTO impact_ledger (task_id, title, quest, layer, impact_score, measured_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (i.task_id, i.title, i.quest, i.layer, i.impact_score, i.measured_at)
                for i in impacts
            ],
        )
        cur.executemany(
            "INSERT INTO quest_budget_allocations (quest, day, allocated_usd) VALUES (%s, %s, %s)",
            [(b.quest, b.day, b.allocated_usd) for b in budgets],
        )


Sample = tuple[str, frozenset[tuple[str, str]]]


def parse(exposition: bytes, openmetrics: bool = False) -> dict[Sample, float]:
    """Parse a text (or OpenMetrics) exposition into {(sample name, labels): value}."""
    out: dict[Sample, float] = {}
    parser = openmetrics_families if openmetrics else text_string_to_metric_families
    for fam in parser(exposition.decode("utf-8")):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def key(name: str, **labels: str) -> Sample:
    return (name, frozenset(labels.items()))


# --------------------------------------------------------------------------------------------
# Reference model


@dataclass
class Rules:
    """The defaults of the metric contract."""

    window: timedelta = timedelta(days=30)
    grace: timedelta = timedelta(hours=6)
    waste_tokens: int = 1000
    waste_impact: float = 0.5
    top_eff: int = 15
    top_waste: int = 20
    max_quests: int = 50
    fold_hold_days: int = 7
    max_layers: int = 10
    max_models: int = 25
    max_len: int = 128
    timezone: str = "UTC"  # whose calendar months the budget families count
    catalogue: str = field(default_factory=lambda: f"genai-prices-{_version('genai-prices')}")

    def label(self, value: str | None) -> str:
        """A label value as the exporter cleans it: control characters dropped, cut to
        ``max_len``, "unknown" for none or blank."""
        if value is None:
            return "unknown"
        s = "".join(ch for ch in value if unicodedata.category(ch) != "Cc")[: self.max_len]
        return s if s.strip() else "unknown"


def valid(c: Call) -> bool:
    """Whether a call counts in the sums (else it is excluded, for ``exclusion_reason``)."""
    if c.ts is None or c.cost_usd is None:
        return False
    cost = Decimal(c.cost_usd)
    if cost.is_nan() or cost < 0 or cost.is_infinite():
        return False
    optional = (c.cache_read_tokens, c.cache_write_tokens, c.reasoning_tokens)
    return (
        c.input_tokens is not None
        and c.output_tokens is not None
        and all(_count_ok(v) for v in (c.input_tokens, c.output_tokens, *optional))
    )


def _count_ok(v: Any) -> bool:
    """A token count a valid row may hold: none (an optional one's 0), or a finite count."""
    return v is None or (Decimal(v).is_finite() and v >= 0)


_CATALOGUE: dict[str, Any] = {}


def list_price(c: Call) -> Decimal | None:
    """The call's value at its provider's list price in genai-prices, on the call's day."""
    from genai_prices import data_snapshot

    if not _CATALOGUE:
        _CATALOGUE.update({p.id: p for p in data_snapshot.get_snapshot().providers})
    provider = PRICE_PROVIDER.get(FAMILY_OF.get(c.provider or "", "other"))
    if provider is None:
        return None
    ref = c.ref()
    found = ref and (
        _CATALOGUE[provider].find_model(ref) or _CATALOGUE[provider].find_model(c.model_label())
    )
    if not found:
        return None
    p = found.get_prices(c.ts)

    def per_mtok(v: Any) -> Decimal | None:
        return None if v is None else Decimal(getattr(v, "base", v))

    pin, pout = per_mtok(p.input_mtok), per_mtok(p.output_mtok)
    if pin is None or pout is None:
        return None
    pcr = per_mtok(p.cache_read_mtok) or pin
    pcw = per_mtok(p.cache_write_mtok) or pin
    k = c.categories()
    return (
        k["input"] * pin + k["output"] * pout + k["cache_read"] * pcr + k["cache_write"] * pcw
    ) / Decimal(1_000_000)


def expected(
    calls: list[Call],
    impacts: list[Impact],
    budgets: list[Budget],
    now: datetime,
    today: date,
    today_start: datetime,
    r: Rules | None = None,
) -> dict[Sample, float]:
    """Every ledger sample the exporter must publish for these rows at ``now``."""
    r = r or Rules()
    lab = r.label
    valid_calls = [c for c in calls if valid(c)]
    out: dict[Sample, float] = {}

    def add(name: str, value: float | Decimal, **labels: str) -> None:
        k = key(name, **labels)
        out[k] = out.get(k, 0.0) + float(value)  # a numeric column's tokens are Decimals

    # Cardinality guard: layers and models by their spend, by row time, since the midnight 30
    # days before today (whole days: they move once a day); quests day by day (fold_days).
    window_start = now - r.window
    weights_start = datetime.combine(today - r.window, time(), ZoneInfo(r.timezone))
    # Weights are exact sums, compared as floats: the float nearest each sum.
    qw: dict[str, float] = defaultdict(float)
    lw: dict[str, Decimal] = defaultdict(Decimal)
    for c in valid_calls:
        w = c.cost_usd if c.ts >= weights_start else Decimal(0)  # type: ignore[operator]
        qw[lab(c.quest)] += 0.0
        lw[lab(c.layer)] += w  # type: ignore[operator]

    # Per task, over all valid rows; in the window if any valid row is.
    tasks: dict[str, dict[str, Any]] = {}
    for c in sorted(valid_calls, key=lambda c: c.ts):  # type: ignore[arg-type,return-value]
        if c.task_id is None:
            continue
        t = tasks.setdefault(
            c.task_id, {"cost": Decimal(0), "tokens": 0, "fams": set(), "listed": Decimal(0)}
        )
        t["listed"] += list_price(c) or 0
        t["cost"] += Decimal(c.cost_usd)  # type: ignore[arg-type]
        t["tokens"] += c.input_tokens + c.output_tokens  # type: ignore[operator]
        t["last"] = c.ts
        t["quest"], t["layer"] = c.quest, c.layer
    in_window = {tid: t for tid, t in tasks.items() if t["last"] >= window_start}
    impact_of: dict[str, float | None] = {}
    for i in sorted(impacts, key=lambda i: (i.measured_at is not None, i.measured_at or now)):
        score = i.impact_score
        impact_of[i.task_id] = None if score is None or not math.isfinite(score) else score
    waste = {
        tid: t
        for tid, t in in_window.items()
        if t["tokens"] > r.waste_tokens
        and t["last"] < now - r.grace
        and (impact_of.get(tid) is None or impact_of[tid] <= r.waste_impact)  # type: ignore[operator]
    }
    for t in waste.values():
        qw[lab(t["quest"])] += 0.0
        lw[lab(t["layer"])] += 0
    for t in in_window.values():
        qw[lab(t["quest"])] += 0.0
    # This month, in the configured zone.
    month_first = today.replace(day=1)
    following = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    zone = ZoneInfo(r.timezone)
    month_start = datetime.combine(month_first, time(), zone)
    month_end = datetime.combine(following, time(), zone)
    in_month = [b for b in budgets if month_first <= b.day < following]
    # A quest also keeps its label when among the largest positive allocations today.
    qb: dict[str, float] = defaultdict(float)
    for b in in_month:
        qw[lab(b.quest)] += 0.0
        a = None if b.allocated_usd is None else Decimal(b.allocated_usd)
        if b.day == today and a is not None and a.is_finite() and a > 0:
            qb[lab(b.quest)] += float(a)

    def top_q(weights: dict[str, float]) -> set[str]:
        ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))
        return {k for k, _ in ranked[: r.max_quests]}

    # Quests: the fold's kept quests of today (every quest with valid rows when there are no
    # more of them than max_quests), room left by name, and today's largest budgets.
    spenders = {lab(c.quest) for c in valid_calls}
    kept_days = fold_days(valid_calls, budgets, today, r) if len(spenders) > r.max_quests else None
    kept_q = set(spenders) if kept_days is None else set(kept_days.get(today, set()))
    if len(kept_q) < r.max_quests:
        rest = sorted(q for q in qw if q not in kept_q)
        kept_q |= set(rest[: r.max_quests - len(kept_q)])
    kept_q |= top_q(qb)

    def counted(c: Call, day: date | None = None) -> str | None:
        """The quest label a counter counts the call under (as if on ``day``); None: not
        shown, as kept neither today nor yesterday."""
        if kept_days is None:
            return lab(c.quest)
        if day is None:
            day = min(c.ts.astimezone(ZoneInfo(r.timezone)).date(), today)  # type: ignore[union-attr]
        label = lab(c.quest) if lab(c.quest) in kept_days[day] else "other"
        yesterday = kept_days.get(today - timedelta(days=1), set())
        return label if label == "other" or label in kept_q | yesterday else None

    by_weight = sorted(lw.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    kept_l = {k for k, _ in by_weight[: r.max_layers]}

    def fq(value: str | None) -> str:
        return lab(value) if lab(value) in kept_q else "other"

    def fl(value: str | None) -> str:
        return lab(value) if lab(value) in kept_l else "other"

    # Models keep a label when among the max_models largest by window spend or window tokens.
    mw: dict[str, Decimal] = defaultdict(Decimal)
    mt: dict[str, Tokens] = defaultdict(int)
    for c in valid_calls:
        inside = c.ts >= weights_start  # type: ignore[operator]
        mw[c.model_label()] += c.cost_usd if inside else Decimal(0)  # type: ignore[operator]
        mt[c.model_label()] += sum(c.categories().values()) if inside else 0

    def top(weights: dict[str, Any]) -> set[str]:
        ranked = sorted(weights.items(), key=lambda kv: (-float(kv[1]), kv[0]))
        return {k for k, _ in ranked[: r.max_models]}

    kept_m = top(mw) | top(mt)

    def fm(c: Call) -> str:
        return c.model_label() if c.model_label() in kept_m else "other"

    # Cumulative counters and today's spend.
    spend_today: dict[str, float] = {}
    spend_month: dict[str, float] = {}
    listed: dict[Sample, Decimal] = defaultdict(Decimal)
    for c in valid_calls:
        fam = FAMILY_OF.get(c.provider or "", "other")
        quest = counted(c)
        per_model = {"provider": fam, "model": fm(c)}
        add("scidex_model_spend_usd_total", float(c.cost_usd), **per_model)  # type: ignore[arg-type]
        add("scidex_model_calls_total", 1, **per_model)
        for direction, n in c.categories().items():
            add("scidex_model_tokens_total", n, direction=direction, **per_model)
        value = list_price(c)
        if value is None:
            add("scidex_unpriced_calls_total", 1, **per_model)
            for direction, n in c.categories().items():
                add("scidex_unpriced_tokens_total", n, direction=direction, **per_model)
        else:
            listed[
                key("scidex_model_list_price_usd_total", catalogue=r.catalogue, **per_model)
            ] += value
        # The series of today's rows of the quest exists, at 0 when none counted there yet.
        quest_today = counted(c, today)
        if quest_today is not None:
            zero = {"quest": quest_today, "layer": fl(c.layer), "provider": fam}
            for name in ("scidex_spend_usd_total", "scidex_llm_calls_total"):
                add(name, 0, **zero)
            add("scidex_reasoning_tokens_total", 0, **zero)
            for direction in c.categories():
                add("scidex_tokens_total", 0, direction=direction, **zero)
            if value is not None:
                listed[key("scidex_list_price_usd_total", catalogue=r.catalogue, **zero)] += 0
        if quest is not None:
            labels = {"quest": quest, "layer": fl(c.layer), "provider": fam}
            add("scidex_spend_usd_total", float(c.cost_usd), **labels)  # type: ignore[arg-type]
            add("scidex_llm_calls_total", 1, **labels)
            add("scidex_reasoning_tokens_total", c.reasoning_tokens or 0, **labels)
            for direction, n in c.categories().items():
                add("scidex_tokens_total", n, direction=direction, **labels)
            if value is not None:
                listed[key("scidex_list_price_usd_total", catalogue=r.catalogue, **labels)] += value
        if c.ts >= today_start:  # type: ignore[operator]
            spend_today[fq(c.quest)] = spend_today.get(fq(c.quest), 0.0) + float(c.cost_usd)  # type: ignore[arg-type]
        if c.ts >= month_start:  # type: ignore[operator]
            spend_month[fq(c.quest)] = spend_month.get(fq(c.quest), 0.0) + float(c.cost_usd)  # type: ignore[arg-type]
    out.update({k: float(v) for k, v in listed.items()})
    if valid_calls:
        newest = max(c.ts.timestamp() for c in valid_calls)  # type: ignore[union-attr]
        out[key("scidex_ledger_last_call_timestamp_seconds")] = newest
    reasons = [
        "null_timestamp",
        "infinite_timestamp",  # a datetime cannot be infinite: tests write such rows in SQL
        "null_cost",
        "nan_cost",
        "negative_cost",
        "infinite_cost",
        "invalid_tokens",
    ]
    for reason in reasons:
        out[key("scidex_ledger_excluded_rows", relation="cost_ledger", reason=reason)] = 0.0
    for c in calls:
        if not valid(c):
            reason = exclusion_reason(c)
            add("scidex_ledger_excluded_rows", 1, relation="cost_ledger", reason=reason)

    # Today's budget, this month's to date and the whole month's.
    alloc: dict[str, float] = {}
    to_date: dict[str, float] = {}
    month: dict[str, float] = {}
    bad_budget = 0
    for b in in_month:
        a = None if b.allocated_usd is None else Decimal(b.allocated_usd)
        if a is None or a.is_nan() or a < 0 or a.is_infinite():
            bad_budget += 1
            continue
        month[fq(b.quest)] = month.get(fq(b.quest), 0.0) + float(a)
        if b.day <= today:
            to_date[fq(b.quest)] = to_date.get(fq(b.quest), 0.0) + float(a)
        if b.day == today:
            alloc[fq(b.quest)] = alloc.get(fq(b.quest), 0.0) + float(a)
    out[
        key(
            "scidex_ledger_excluded_rows",
            relation="quest_budget_allocations",
            reason="invalid_allocation",
        )
    ] = float(bad_budget)
    for quest, usd in alloc.items():
        out[key("scidex_budget_allocated_usd", quest=quest)] = usd
        spend_today.setdefault(quest, 0.0)
        if usd > 0:
            out[key("scidex_budget_utilization_ratio", quest=quest)] = spend_today[quest] / usd
    for quest, usd in to_date.items():
        out[key("scidex_budget_allocated_month_to_date_usd", quest=quest)] = usd
    for quest, usd in month.items():
        out[key("scidex_budget_allocated_month_usd", quest=quest)] = usd
        spend_month.setdefault(quest, 0.0)
    for quest, v in spend_month.items():
        out[key("scidex_quest_spend_month_usd", quest=quest)] = v
    out[key("scidex_budget_month_end_timestamp_seconds")] = month_end.timestamp()
    for quest, v in spend_today.items():
        out[key("scidex_quest_spend_today_usd", quest=quest)] = v

    # Efficiency rankings by billed cost and by list price (subscription tasks ranked too), by
    # ratio then task_id in code point order. Two ids that clean to the same labels: the
    # better-ranked one keeps the series.
    for basis, ratio_name, value_name in (
        ("cost", "scidex_task_impact_per_usd", "scidex_task_cost_usd"),
        ("listed", "scidex_task_impact_per_list_usd", "scidex_task_list_price_usd"),
    ):
        ranked = sorted(
            (
                (impact_of[tid] / float(t[basis]), tid)  # type: ignore[operator]
                for tid, t in in_window.items()
                if t[basis] > 0 and (impact_of.get(tid) or 0) > 0
            ),
            key=lambda x: (-x[0], x[1]),
        )[: r.top_eff]
        for ratio, tid in ranked:
            t = in_window[tid]
            labels = {"task_id": lab(tid), "quest": lab(t["quest"]), "layer": lab(t["layer"])}
            if key(ratio_name, **labels) in out:
                continue
            out[key(ratio_name, **labels)] = ratio
            out[key(value_name, **labels)] = float(t[basis])
            if basis == "cost":
                out[key("scidex_task_impact_score", **labels)] = impact_of[tid]  # type: ignore[assignment]

    # Waste.
    for tid in sorted(waste, key=lambda tid: (-waste[tid]["tokens"], tid))[: r.top_waste]:
        t = waste[tid]
        labels = {"task_id": lab(tid), "quest": lab(t["quest"]), "layer": lab(t["layer"])}
        if key("scidex_task_wasted_tokens", **labels) in out:
            continue
        out[key("scidex_task_wasted_tokens", **labels)] = float(t["tokens"])
        out[key("scidex_task_wasted_usd", **labels)] = float(t["cost"])
    for t in waste.values():
        labels = {"quest": fq(t["quest"]), "layer": fl(t["layer"])}
        add("scidex_wasted_tokens", t["tokens"], **labels)
        add("scidex_wasted_usd", float(t["cost"]), **labels)
        add("scidex_wasted_tasks", 1, **labels)
        add("scidex_wasted_list_price_usd", float(t["listed"]), **labels)

    # Per-quest impact over the window.
    qcost: dict[str, float] = defaultdict(float)
    qimpact: dict[str, float] = defaultdict(float)
    for tid, t in in_window.items():
        qcost[fq(t["quest"])] += float(t["cost"])
        qimpact[fq(t["quest"])] += impact_of.get(tid) or 0.0
    for quest in qcost:
        out[key("scidex_quest_window_spend_usd", quest=quest)] = qcost[quest]
        out[key("scidex_quest_window_impact_score", quest=quest)] = qimpact[quest]
        if qcost[quest] > 0:
            out[key("scidex_quest_impact_per_usd", quest=quest)] = qimpact[quest] / qcost[quest]

    # Provider families over the tasks in the window (all of their rows).
    pcost: dict[str, float] = defaultdict(float)
    ptokens: dict[str, Decimal | int] = defaultdict(int)  # exact: tokens may be Decimals
    ptasks: dict[str, set[str]] = defaultdict(set)
    plisted: dict[str, Decimal] = defaultdict(Decimal)
    for c in valid_calls:
        if c.task_id in in_window:
            fam = FAMILY_OF.get(c.provider or "", "other")
            plisted[fam] += list_price(c) or 0
            pcost[fam] += float(c.cost_usd)  # type: ignore[arg-type]
            ptokens[fam] += c.input_tokens + c.output_tokens  # type: ignore[operator]
            ptasks[fam].add(c.task_id)
    for fam in FAMILIES:
        out[key("scidex_provider_spend_usd", provider=fam)] = pcost[fam]
        out[key("scidex_provider_tokens", provider=fam)] = float(ptokens[fam])
        out[key("scidex_provider_tasks", provider=fam)] = float(len(ptasks[fam]))
        out[key("scidex_provider_list_price_usd", provider=fam)] = float(plisted[fam])
        if ptasks[fam]:
            out[key("scidex_provider_avg_cost_per_task_usd", provider=fam)] = pcost[fam] / len(
                ptasks[fam]
            )
    return out


def fold_days(
    valid: list[Call], budgets: list[Budget], today: date, r: Rules
) -> dict[date, set[str]]:
    """The quests kept on each day, from the first day with spend to ``today``.

    Candidates: the max_quests largest by spend over the 30 days before yesterday, and the
    max_quests largest positive allocations of yesterday. Held: the candidates and free places
    of the fold_hold_days days before. Candidates then held ones (most recent first) up to twice
    max_quests; then quests that spend that day, in the order of their first row, take a free
    place while fewer than max_quests of that day's spenders are kept.
    """
    zone = ZoneInfo(r.timezone)
    lab = r.label
    spend: dict[tuple[str, date], Decimal] = defaultdict(Decimal)
    spenders: dict[date, list[str]] = defaultdict(list)  # in the order of their first row
    for c in valid:  # rows take ids in list order
        day = min(c.ts.astimezone(zone).date(), today)  # type: ignore[union-attr]
        spend[(lab(c.quest), day)] += Decimal(c.cost_usd)  # type: ignore[arg-type]
        if lab(c.quest) not in spenders[day]:
            spenders[day].append(lab(c.quest))
    alloc: dict[tuple[str, date], Decimal] = defaultdict(Decimal)
    for b in budgets:
        a = None if b.allocated_usd is None else Decimal(b.allocated_usd)
        if a is not None and a.is_finite() and a > 0:
            alloc[(lab(b.quest), b.day)] += a

    def largest(weights: dict[str, Decimal]) -> set[str]:
        positive = sorted((-w, q) for q, w in weights.items() if w > 0)
        return {q for _, q in positive[: r.max_quests]}

    quests = {q for q, _ in spend}
    chosen: dict[date, set[str]] = {}
    kept: dict[date, set[str]] = {}
    day = min(d for _, d in spend)
    while day <= today:
        ranked = {
            q: sum(
                (spend.get((q, day - timedelta(days=n)), Decimal(0)) for n in range(2, 32)),
                Decimal(0),
            )
            for q in quests
        }
        yesterday = {q: a for (q, d), a in alloc.items() if d == day - timedelta(days=1)}
        candidates = largest(ranked) | largest(yesterday)
        order = sorted(candidates)
        for back in range(1, r.fold_hold_days + 1):
            for q in sorted(chosen.get(day - timedelta(days=back), set())):
                if q not in order:
                    order.append(q)
        base = set(order[: 2 * r.max_quests])
        free = [q for q in spenders.get(day, []) if q not in base]
        places = r.max_quests - len(base & set(spenders.get(day, [])))
        free = free[: max(places, 0)]
        chosen[day] = candidates | set(free)
        kept[day] = base | set(free)
        day += timedelta(days=1)
    return kept


def exclusion_reason(c: Call) -> str:
    """Why an invalid call is left out: its ``reason`` label."""
    if c.ts is None:
        return "null_timestamp"
    if c.cost_usd is None:
        return "null_cost"
    cost = Decimal(c.cost_usd)
    if cost.is_nan():
        return "nan_cost"
    if cost < 0:
        return "negative_cost"
    if cost.is_infinite():
        return "infinite_cost"
    return "invalid_tokens"


def ledger_samples(samples: dict[Sample, float]) -> dict[Sample, float]:
    """Drop the exporter's own health samples, keeping the ledger families."""
    return {k: v for k, v in samples.items() if not k[0].startswith("scidex_exporter_")}
