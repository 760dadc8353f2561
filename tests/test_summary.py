"""The window summary: exact impact sums round as math.fsum does, whatever is taken out; dollars
held as integers are the Decimals they came from, and so are list prices computed as integers;
a ranking holding a few keys publishes what sorting every key would."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from itertools import islice
from types import SimpleNamespace
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from exporter.config import load_settings
from exporter.incremental import Sums
from exporter.prices import Price
from exporter.store import Task
from exporter.summary import Ranking, Summary, _float, amount, dollars, exact, rounded
from exporter.tasks import lister

FINITE = st.floats(min_value=-1e300, max_value=1e300)  # no sum of 50 can overflow


@given(st.lists(FINITE, max_size=40), st.lists(FINITE, max_size=10))
def test_an_exact_sum_with_some_taken_out_is_the_fsum_of_the_rest(
    kept: list[float], gone: list[float]
) -> None:
    total = sum(exact(x) for x in kept + gone)
    total -= sum(exact(x) for x in gone)
    assert rounded(total) == math.fsum(kept)


def test_the_extremes_are_exact() -> None:
    tiny = 5e-324  # the smallest subnormal
    assert exact(tiny) == 1
    assert rounded(exact(1e308) + exact(1e308) - exact(1e308)) == 1e308
    assert rounded(exact(0.1) + exact(0.2)) == math.fsum([0.1, 0.2]) == 0.30000000000000004
    assert rounded(-2 * exact(1.7e308)) == -math.inf  # past the largest float


def _decimals(largest: int, places: int) -> st.SearchStrategy[Decimal]:
    """Finite Decimals from 0 to ``largest`` with at most ``places`` decimals."""
    return st.decimals(min_value=0, max_value=largest, places=None, allow_nan=False).filter(
        lambda d: isinstance(e := d.as_tuple().exponent, int) and e >= -places
    )


# Ledger costs and list prices, with up to 18 decimals (finer than the integers' 12): no sum of
# 25 has more digits than a Decimal context holds (28), so the Decimal sum is exact too.
DOLLARS = _decimals(10**6, 18)


@given(st.lists(DOLLARS, max_size=20), st.lists(DOLLARS, max_size=5))
def test_dollars_as_integers_sum_to_the_exact_decimal_sum(
    kept: list[Decimal], gone: list[Decimal]
) -> None:
    total = sum((amount(d) for d in kept + gone), start=0)
    total -= sum((amount(d) for d in gone), start=0)
    exact_sum = sum(kept, start=Decimal(0))
    assert dollars(total) == exact_sum
    assert _float(total) == float(exact_sum)


def test_dollars_finer_than_the_integers_stay_exact() -> None:
    assert amount(Decimal("0.000001")) == 10**6
    fine = amount(Decimal("1E-15"))
    assert isinstance(fine, Decimal) and dollars(fine + amount(Decimal(2))) == Decimal(
        "2.000000000000001"
    )
    assert _float(amount(Decimal("0.1"))) == 0.1


# Prices per million tokens with up to nine decimals: up to six are whole units per token.
PER_MILLION = _decimals(1000, 9)
TOKENS = st.one_of(st.none(), st.integers(0, 10**12).map(Decimal))  # NULL: a column it lacks


@given(st.lists(PER_MILLION, min_size=4, max_size=4), st.lists(TOKENS, min_size=4, max_size=4))
@example([Decimal(3), Decimal(15), Decimal("0.3"), Decimal("3.75")], [Decimal(7)] * 4)
@example([Decimal("0.0000001"), Decimal(1), Decimal(1), Decimal(1)], [Decimal(3)] * 4)
def test_a_rows_list_price_is_the_exact_price_of_its_tokens(
    per_million: list[Decimal], tokens: list[Decimal | None]
) -> None:
    names = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    row = SimpleNamespace(**dict(zip(names, tokens, strict=True)))
    price = Price(*per_million)
    listed = lister(price)(*(int(t or 0) for t in tokens))
    with localcontext() as ctx:
        ctx.prec = 100
        value = sum((p * (t or 0) for p, t in zip(per_million, tokens, strict=True)), Decimal(0))
        assert Decimal(listed) == value / 10**6 * 10**12
    # The same formula as the cumulative list-price counters' (prices.Price.value): written
    # twice for the rebuild's speed, so the two must not drift apart.
    assert Decimal(listed) == price.value(Sums.of(row)).scaleb(12)
    if all(p.as_tuple().exponent >= -6 for p in per_million):  # type: ignore[operator]
        assert isinstance(listed, int)
    assert lister(None)(1, 2, 3, 4) == 0


@given(
    st.integers(1, 4),
    st.integers(0, 3),
    st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60),
)
@example(1, 0, [(True, 1), (True, 2), (True, 3), (False, 0), (False, 1)])  # refilled, then
@settings(max_examples=300)  # a key not held is taken out
def test_a_ranking_publishes_the_smallest_keys_added_and_not_removed(
    top: int, spare: int, ops: list[tuple[bool, int]]
) -> None:
    ranking = Ranking(top, spare)
    keys: set[tuple[int, str]] = set()  # what was added and not removed
    for n, (add, value) in enumerate(ops):
        if add or not keys:
            key = (value, f"t{n}")  # ties on the value rank by the second part
            ranking.add(key)
            keys.add(key)
        else:
            key = sorted(keys)[value % len(keys)]
            ranking.remove(key)
            keys.remove(key)
        assert len(ranking.held) <= top + spare
        if ranking.stale:
            ranking.refill(iter(keys))
        assert list(ranking.best()) == sorted(keys)[:top]
        assert ranking.count == len(keys)


# A task as the summary takes it: its spends by provider family (cost and list price in
# summary's units), its labels, its impact and whether it is waste.
SPEND = st.tuples(
    st.sampled_from(["max", "codex", "other"]),
    st.integers(0, 10**15),
    st.integers(0, 10**6),
    st.integers(0, 10**15),
)
TASK = st.tuples(
    st.lists(SPEND, min_size=1, max_size=3),
    st.sampled_from([None, "q1", "q2"]),
    st.sampled_from([None, "Agora", "Forge"]),
    st.one_of(st.none(), st.floats(-10, 10)),
    st.booleans(),
)


@given(st.lists(TASK, max_size=30), st.lists(st.tuples(st.booleans(), st.integers(0, 8))))
@settings(max_examples=200)
def test_a_summary_changed_in_batches_sums_and_ranks_what_it_holds(
    pool: list[tuple[Any, ...]], ops: list[tuple[bool, int]]
) -> None:
    summary = Summary(load_settings({"top_efficiency_tasks": 3}, env={}))
    held: dict[str, tuple[Task, float | None, bool]] = {}
    fresh = iter(enumerate(pool))
    for add, size in ops:
        if add:
            batch = []
            for n, (spends, quest, layer, impact, wasted) in islice(fresh, size):
                task = Task()
                for family, cost, tokens, listed in spends:
                    task.add(family, cost, tokens, listed)
                task.label(n, quest, layer)
                batch.append((f"t{n}", task, impact, wasted))
            summary.add(batch)
        else:
            batch = [(k, *held[k]) for k in sorted(held)[:size]]
            summary.remove(batch)
        for task_id, *entry in batch:
            if add:
                held[task_id] = tuple(entry)
            else:
                del held[task_id]
        every = [(k, *entry) for k, entry in held.items()]  # a stale ranking looks again
        rows = summary.rows(lambda k: held[k][0], lambda k: held[k][1], every.__iter__)
        got: dict[str, Any] = {"quest": {}, "provider": {}, "waste_total": {}}
        for r in rows:
            if r.kind == "quest":
                got["quest"][r.quest] = (r.cost, r.tokens, rounded(r.impact_exact), r.tasks)
            elif r.kind == "provider":
                got["provider"][r.family] = (r.cost, r.tokens, r.tasks, r.listed)
            elif r.kind == "waste_total":
                got["waste_total"][r.quest, r.layer] = (r.cost, r.tokens, r.tasks, r.listed)
        # the same, summed from the tasks held, each spend as the ledger would have written it
        want: dict[str, Any] = {"quest": {}, "provider": {}, "waste_total": {}}
        scored = []
        for task_id, (task, impact, wasted) in held.items():
            n = int(task_id[1:])
            spends = pool[n][0]
            cost = sum(c for _, c, _, _ in spends)
            tokens = sum(t for _, _, t, _ in spends)
            listed = sum(li for _, _, _, li in spends)
            q = want["quest"].setdefault(task.quest, [0, 0, [], 0])
            q[0] += cost
            q[1] += tokens
            q[2].append(0.0 if impact is None else impact)
            q[3] += 1
            for family in {f for f, _, _, _ in spends}:
                mine = [s for s in spends if s[0] == family]
                p = want["provider"].setdefault(family, [0, 0, 0, 0])
                p[0] += sum(s[1] for s in mine)
                p[1] += sum(s[2] for s in mine)
                p[2] += 1
                p[3] += sum(s[3] for s in mine)
            if wasted:
                w = want["waste_total"].setdefault((task.quest, task.layer), [0, 0, 0, 0])
                for i, value in enumerate((cost, tokens, 1, listed)):
                    w[i] += value
            if impact is not None and impact > 0 and cost > 0:
                scored.append((-(impact / (cost / 10**12)), task_id))
        unit = Decimal(10) ** -12
        assert got["quest"] == {
            k: (c * unit, t, math.fsum(i), n) for k, (c, t, i, n) in want["quest"].items()
        }
        assert got["provider"] == {
            k: (c * unit, t, n, li * unit) for k, (c, t, n, li) in want["provider"].items()
        }
        assert got["waste_total"] == {
            k: (c * unit, t, n, li * unit) for k, (c, t, n, li) in want["waste_total"].items()
        }
        ranked = [r.task_id for r in rows if r.kind == "efficiency"]
        assert ranked == [task_id for _, task_id in sorted(scored)[:3]]
