"""Refresh cost at two ledger sizes, against two baselines, in one run.

    python -m bench.refresh [--sizes 1000000,10000000] [--runs 5] [--rounds 15] [--batch 1000]
                            [--days N] [--task-ids short|uuid]

For each size, a synthetic ledger at the same daily rate (1 M rows per 30 days, so a larger
ledger is a longer history with the same window; ``--days 30`` puts every size in the window
instead) is loaded into an embedded PostgreSQL, and:

* full refresh: every query recomputed over the whole ledger (``reconcile_interval 0``);
* steady-state refresh: the incremental exporter after a batch of new rows, every size in
  turn (rounds), after each size's other measurements: a size's steady refresh against
  the first size's is the median of the ratios within rounds;
* floor: the same full-refresh SQL run by ``psql`` (no Python at all), in turn with the full
  refreshes, so that the machine's drift falls on both: full / floor is the median of the
  ratios of each pair. Beside the wall times, the CPU time of each client (the exporter's
  Python and libpq; ``psql``'s), which the machine's drift moves less and PostgreSQL's own
  work not at all: what the exporter adds to the database's time is there;
* query-exporter: the generic SQL exporter (PyPI, ``QE_VERSION``, in its own venv under
  bench/.venv-qe-<version>) computing the families of our spend_totals query with the same
  row validity: spend, tokens and calls (its spend query), the same seven sums by series and
  model as ours (its model query), and the rows left out by reason (its excluded-rows query,
  a second scan; ours classifies them in the same scan); the mean latency of each;
* peak RSS of a ``resource-exporter serve`` process that reconciled a few times (plus what
  its server process holds of its own), and of one that reaches no database: the runtime
  alone (Python, libraries, price catalogue), so that the difference is what the ledger costs.

Medians (query-exporter: mean of its runs) and ratios are printed as a Markdown table, then
where a steady refresh spends its time: each query's wait for PostgreSQL and its Python, each
source's building of families, and the rendering of the exposition.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict

from bench.load import database, exporter_process, footprint_kib, refreshes, scrape
from exporter import generate
from exporter import queries as q
from exporter.config import env_var, load_settings
from exporter.refresh import Refresher
from exporter.sources import Instants
from exporter.sources.spend import SPEND_TOTALS

BENCH = Path(__file__).resolve().parent
QE_VERSION = "5.0.2"
"""The query-exporter compared with, pinned (with its driver) so that runs months apart
compare the same tool."""
QE_PACKAGES = (f"query-exporter=={QE_VERSION}", "psycopg2-binary==2.9.13")
QE_VENV = BENCH / f".venv-qe-{QE_VERSION}"
ROWS_PER_30_DAYS = 1_000_000
SETTINGS: dict[str, Any] = {}
"""Settings every exporter of the run gets besides the DSN (``--setting``)."""


def settings(**values: Any) -> Any:
    return load_settings({**SETTINGS, **values}, env={})


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn``: the CPU of this process (every thread) and of the
    children it waited for meanwhile (``psql``), not PostgreSQL's."""
    started, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - started, _cpu() - cpu


def _cpu() -> float:
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Full(NamedTuple):
    """Full refreshes and the ``psql`` floor, run in turn (medians)."""

    full: float
    spend: float  # its spend/token query alone
    floor: float
    ratio: float  # the median of full / floor over the pairs
    cpu: float  # the exporter's CPU seconds in a full refresh (its Python and libpq)
    floor_cpu: float  # psql's in the floor


def full_and_floor(dsn: str, runs: int) -> Full:
    """A full refresh, then the floor, ``runs`` times: a slow minute of the machine slows one
    pair, not every run of one side."""
    floor = psql_floor(dsn)
    refresher = Refresher(settings(dsn=dsn, reconcile_interval_seconds=0))
    full: list[tuple[float, float]] = []
    spend: list[float] = []
    floors: list[tuple[float, float]] = []
    try:
        refresher.refresh()  # connect and warm the cache once
        for _ in range(runs):
            full.append(cpu_timed(lambda: _ok(refresher.refresh())))
            spend.append(refresher.health.queries[SPEND_TOTALS.name].duration)
            floors.append(cpu_timed(floor))
    finally:
        refresher.close()
    ratios = [f / b for (f, _), (b, _) in zip(full, floors, strict=True)]
    median = statistics.median
    return Full(
        median(f for f, _ in full),
        median(spend),
        median(f for f, _ in floors),
        median(ratios),
        median(c for _, c in full),
        median(c for _, c in floors),
    )


def phases(refresher: Refresher) -> dict[str, float]:
    """Where the last refresh spent its time: each query's wait for PostgreSQL and its Python
    (folding the rows in), each source's building of families, the rendering."""
    h = refresher.health
    out: dict[str, float] = {}
    for query, health in sorted(h.queries.items()):
        out[f"{query}: query"] = health.database
        out[f"{query}: Python"] = health.duration - health.database
    for source, seconds in sorted(h.build_seconds.items()):
        out[f"{source}: families"] = seconds
    assert h.render_seconds is not None  # set by every refresh
    out["rendering"] = h.render_seconds
    return out


class Steady:
    """One ledger's steady refreshes: ``batch`` new rows, then a timed refresh, each ``round``.

    The sizes' rounds run in turn (``steady_rounds``), so that a slow minute of the machine
    slows one round of every size, not every run of one: a steady refresh takes about 0.1 s,
    and when the sizes were measured one after the other, every phase of one size's came out
    about 1.5 times the other's in one run (rendering too, for the same series)."""

    def __init__(self, dsn: str, plan: generate.LedgerPlan, batch: int) -> None:
        self.refresher = Refresher(settings(dsn=dsn))
        self.traffic = generate.LiveTraffic(plan)
        self.batch = batch
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.times: list[float] = []
        self.split: list[dict[str, float]] = []
        try:
            for _ in range(3):  # a full reconciliation first (two if the seed did not take)
                _ok(self.refresher.refresh())
        except BaseException:
            self.close()
            raise

    def round(self) -> float:
        with self.conn.cursor() as cur, cur.copy(generate.COPY_COST) as copy:
            for row in self.traffic.batch(datetime.now(UTC), calls=self.batch):
                copy.write_row(row)
        started = time.perf_counter()
        _ok(self.refresher.refresh())
        self.times.append(time.perf_counter() - started)
        self.split.append(phases(self.refresher) | {"whole refresh": self.times[-1]})
        return self.times[-1]

    def medians(self) -> tuple[float, dict[str, float]]:
        """The median steady refresh, and the median of each phase."""
        split = self.split
        return (
            statistics.median(self.times),
            {name: statistics.median(run[name] for run in split) for name in split[0]},
        )

    def close(self) -> None:
        self.refresher.close()
        self.conn.close()


def steady_rounds(sizes: list[Steady], runs: int) -> list[float]:
    """``runs`` rounds of a steady refresh of each size in turn; for each size, the median
    over the rounds of its time / the first size's in the same round."""
    ratios: list[list[float]] = [[] for _ in sizes]
    for _ in range(runs):
        times = [size.round() for size in sizes]
        for i, t in enumerate(times):
            ratios[i].append(t / times[0])
    return [statistics.median(r) for r in ratios]


def _ok(success: bool) -> None:
    if not success:
        raise RuntimeError("a refresh failed")


def psql_floor(dsn: str) -> Callable[[], object]:
    """The full-refresh SQL through psql, with the parameters rendered as literals."""
    refresher = Refresher(settings(dsn=dsn))
    instants = Instants.at(datetime.now(UTC), refresher.settings)
    with psycopg.connect(dsn) as conn:
        refresher.refresh()  # a first refresh: the plan of a full one (nothing final yet)
        cur = psycopg.ClientCursor(conn)
        snapshot = cur.mogrify(q.SNAPSHOT.sql, q.snapshot_params())
        script = ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;", snapshot + ";"]
        for source in refresher.sources:
            for query in source.queries:
                statement = refresher.statement(query, instants)
                script.append(cur.mogrify(statement.sql, statement.params) + ";")
        script.append("COMMIT;")
    refresher.close()
    path = Path(tempfile.mkdtemp()) / "refresh.sql"
    path.write_text("\n".join(script), encoding="utf-8")
    psql = shutil.which("psql") or "psql"
    run = [psql, "-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "-f", str(path), dsn]
    return lambda: subprocess.run(run, check=True)


# query-exporter's metrics: name -> (description, labels).
_SERIES = ["quest", "layer", "provider"]
QE_METRICS: dict[str, tuple[str, list[str]]] = {
    "qe_spend_usd": ("Cumulative LLM cost", _SERIES),
    "qe_input_tokens": ("Cumulative input tokens", _SERIES),
    "qe_output_tokens": ("Cumulative output tokens", _SERIES),
    "qe_calls": ("Cumulative LLM calls", _SERIES),
    **{
        f"qe_model_{sum_}": (f"Cumulative {sum_.replace('_', ' ')} by model", [*_SERIES, "model"])
        for sum_ in (
            "spend_usd",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "calls",
        )
    },
    "qe_excluded_rows": ("Ledger rows left out of the sums, by reason", ["reason"]),
}


# What a query-exporter user writes for the families of our spend query, with the same row
# validity: the sums, and the rows left out of them by reason (a second query and scan; every
# reason, zeros included, as ours reports them).
# The generated ledger: every optional column, every token column bigint.
_COLUMNS = q.Columns(present=frozenset(q.OPTIONAL_TOKENS), integer=frozenset(q.TOKENS))
QE_QUERIES = {
    "spend": (
        ["qe_spend_usd", "qe_input_tokens", "qe_output_tokens", "qe_calls"],
        f"""SELECT quest, layer, provider, sum(cost_usd) AS qe_spend_usd,
       sum(input_tokens) AS qe_input_tokens, sum(output_tokens) AS qe_output_tokens,
       count(*) AS qe_calls
FROM cost_ledger c
WHERE {_COLUMNS.valid}
GROUP BY quest, layer, provider""",
    ),
    # The same sums as ours, by the same series and model (ours also splits final from tail).
    "models": (
        [name for name in QE_METRICS if name.startswith("qe_model_")],
        f"""SELECT quest, layer, provider, coalesce(model, '') AS model,
       sum(cost_usd) AS qe_model_spend_usd, sum(input_tokens) AS qe_model_input_tokens,
       sum(output_tokens) AS qe_model_output_tokens,
       coalesce(sum(cache_read_tokens), 0) AS qe_model_cache_read_tokens,
       coalesce(sum(cache_write_tokens), 0) AS qe_model_cache_write_tokens,
       coalesce(sum(reasoning_tokens), 0) AS qe_model_reasoning_tokens,
       count(*) AS qe_model_calls
FROM cost_ledger c
WHERE {_COLUMNS.valid}
GROUP BY quest, layer, provider, model""",
    ),
    "excluded": (
        ["qe_excluded_rows"],
        f"""SELECT k.reason, coalesce(x.n, 0) AS qe_excluded_rows
FROM (VALUES {", ".join(f"('{reason}')" for reason in q.REASONS)}) k (reason)
LEFT JOIN (SELECT reason, count(*) AS n
           FROM (SELECT {_COLUMNS.reason} AS reason FROM cost_ledger c) r
           WHERE reason IS NOT NULL
           GROUP BY reason) x USING (reason)""",
    ),
}


def query_exporter(dsn: str, name: str, runs: int, expected_seconds: float) -> float | None:
    """Mean latency of query-exporter's query ``name`` over ``runs`` runs, or None if absent.

    Each query gets its own query-exporter run, so the two never compete for the cores.
    """
    binary = QE_VENV / "bin" / "query-exporter"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(QE_VENV)], check=True)
        subprocess.run(
            [str(QE_VENV / "bin" / "pip"), "install", "-q", *QE_PACKAGES],
            check=True,
        )
    info = conninfo_to_dict(dsn)
    sa_dsn = (
        f"postgresql+psycopg2://{info.get('user', 'postgres')}@/{info.get('dbname', 'postgres')}"
        f"?host={info.get('host', '')}" + (f"&port={info['port']}" if info.get("port") else "")
    )
    interval = max(2, int(expected_seconds * 2) + 1)
    metrics, sql = QE_QUERIES[name]
    config = Path(tempfile.mkdtemp()) / "config.yaml"
    settings = {
        "databases": {"ledger": {"dsn": sa_dsn}},
        "metrics": {
            metric: {"type": "gauge", "description": QE_METRICS[metric][0], "labels": labels}
            for metric in metrics
            for labels in [QE_METRICS[metric][1]]
        },
        "queries": {
            name: {"interval": interval, "databases": ["ledger"], "metrics": metrics, "sql": sql}
        },
    }
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    port = 9561
    pattern = rf'query_latency_(count|sum)\{{[^}}]*query="{name}"[^}}]*\}} (\S+)'.encode()
    with subprocess.Popen(
        [str(binary), "--config", str(config), "-p", str(port), "-H", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            deadline = time.monotonic() + interval * (runs + 2) + 60
            while time.monotonic() < deadline:
                time.sleep(1)
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
                except OSError:
                    continue
                found = {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}
                if found.get(b"count", 0) >= runs and b"sum" in found:
                    return found[b"sum"] / found[b"count"]
            return None
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def peak_rss(dsn: str) -> float:
    """Peak RSS (MiB) of the exporter process, plus its server process' own memory, scraped
    as Prometheus scrapes it (what it holds to answer is counted), after a few refreshes, each
    a reconciliation:
    a serving exporter peaks at its (hourly) reconciliations, above its first refresh, which
    rebuilds nothing held before (at 10 M rows in the window 126.6 against 114.7 MiB)."""
    every_refresh = {env_var("reconcile_interval_seconds"): "0"}
    with exporter_process(dsn, interval=1.0, env=every_refresh) as (url, pid):
        target = (refreshes(scrape(url)) or 0) + 3
        while (refreshes(scrape(url)) or 0) < target:
            time.sleep(0.5)
        return footprint_kib(pid, peak=True) / 1024


def runtime_rss() -> float:
    """Peak RSS (MiB) of an exporter that reaches no database, after a few refreshes: Python,
    the libraries, the price catalogue and the server, which ``peak_rss`` holds before it
    reads a row; the rest of ``peak_rss`` is what the ledger costs."""
    with exporter_process(unreachable_dsn(), interval=0.5, ready=refreshed(3)) as (_, pid):
        return footprint_kib(pid, peak=True) / 1024


def unreachable_dsn() -> str:
    """A DSN no server listens on: a directory with no socket in it."""
    return f"host={tempfile.mkdtemp()} dbname=none"


def refreshed(times: int) -> Callable[[bytes], bool]:
    """Whether an exposition comes from at least ``times`` refreshes (failed or not)."""
    return lambda body: (refreshes(body) or 0) >= times


class Ledger(NamedTuple):
    """A generated ledger in an embedded PostgreSQL of its own."""

    rows: int
    dsn: str
    plan: generate.LedgerPlan


@contextmanager
def ledger(
    rows: int, days: int | None = None, task_ids: str = "short", server: str | None = None
) -> Iterator[Ledger]:
    """A generated ledger of ``rows`` rows, in an embedded PostgreSQL or on ``server``."""
    with database(server, f"ri_bench_{rows}") as dsn:
        # By default the same daily rate (a larger ledger is a longer history); with ``days``,
        # a shape of its own (10 M rows in 30 days: ten times the daily volume in the window).
        days = days or max(30, round(30 * rows / ROWS_PER_30_DAYS))
        with psycopg.connect(dsn, autocommit=True) as conn:
            print(f"loading {rows:,} rows over {days} days ...", file=sys.stderr)
            progress = generate.Progress(rows).update
            plan = generate.load(conn, rows, days=days, progress=progress, task_ids=task_ids)
            conn.execute("VACUUM ANALYZE")
        yield Ledger(rows, dsn, plan)


def bench_size(data: Ledger, runs: int, quick: bool = False) -> dict[str, Any]:
    """What one ledger is measured for alone (the steady refresh is measured in rounds with
    the other sizes: ``steady_rounds``)."""
    full = full_and_floor(data.dsn, runs)
    result = {
        "rows": data.rows,
        **full._asdict(),
        **{
            key: None if quick else query_exporter(data.dsn, name, min(runs, 3), full.full)
            for key, name in (
                ("qe", "spend"),
                ("qe_models", "models"),
                ("qe_excluded", "excluded"),
            )
        },
        "rss": float("nan") if quick else peak_rss(data.dsn),
        "runtime_rss": float("nan") if quick else runtime_rss(),
    }
    print(result, file=sys.stderr)
    return result


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _ratio(ours: float, baseline: float | None) -> str:
    return "n/a" if not baseline else f"{ours / baseline:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000, help="new rows per steady refresh")
    parser.add_argument(
        "--rounds", type=int, default=15, help="steady refreshes of each size (in turn)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="refresh timings only (no query-exporter, no RSS)"
    )
    parser.add_argument(
        "--days",
        type=int,
        default=None,
        help="days of history for every size (default: 1 M rows per 30 days)",
    )
    parser.add_argument(
        "--task-ids",
        choices=generate.TASK_IDS,
        default="short",
        help="shape of the ledgers' task ids (default short: 11 characters; uuid: UUIDs)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every exporter of the run (e.g. work_mem_mb=256)",
    )
    parser.add_argument(
        "--server",
        metavar="DSN",
        help="a PostgreSQL server to load each ledger into, as a database of its own"
        " (ri_bench_<rows>, dropped after), instead of an embedded PostgreSQL",
    )
    args = parser.parse_args()
    for item in args.setting:
        name, _, value = item.partition("=")
        SETTINGS[name] = value
        os.environ[env_var(name)] = value  # the served exporter's too
    with ExitStack() as stack:
        ledgers = [
            stack.enter_context(ledger(int(s), args.days, args.task_ids, args.server))
            for s in args.sizes.split(",")
        ]
        results = [bench_size(data, args.runs, args.quick) for data in ledgers]
        sizes = []
        try:
            for data in ledgers:
                sizes.append(Steady(data.dsn, data.plan, args.batch))
            pairs = steady_rounds(sizes, args.rounds)
            for result, size, pair in zip(results, sizes, pairs, strict=True):
                result["steady"], result["phases"] = size.medians()
                result["steady_pair"] = pair
        finally:
            for size in sizes:
                size.close()
    base = results[0]
    print(
        "| ledger rows | full refresh | psql floor | full / floor (median of pairs) | "
        "exporter CPU, full | psql CPU, floor | "
        f"steady refresh ({args.batch} new rows) | steady / full | "
        f"steady / steady at {base['rows']:,} (median of rounds) | "
        "our spend query, full | query-exporter: spend query | + its excluded-rows query | "
        "query-exporter: the same sums by model | ours / query-exporter, spend query | "
        "ours / query-exporter, same families | ours / query-exporter, same sums and "
        "families | peak RSS | peak RSS with no database |"
    )
    print("|---" * 18 + "|")
    for r in results:
        qe, models, excluded = r["qe"], r["qe_models"], r["qe_excluded"]
        same = qe + excluded if qe is not None and excluded is not None else None
        same_sums = models + excluded if models is not None and excluded is not None else None
        print(
            f"| {r['rows']:,} | {r['full']:.2f} s | {r['floor']:.2f} s | "
            f"{r['ratio']:.2f} | {r['cpu']:.2f} s | {r['floor_cpu']:.2f} s | "
            f"{r['steady'] * 1000:.0f} ms | "
            f"{r['steady'] / r['full']:.3f} | {r['steady_pair']:.2f} | "
            f"{r['spend']:.2f} s | {_seconds(qe)} | {_seconds(excluded)} | {_seconds(models)} | "
            f"{_ratio(r['spend'], qe)} | {_ratio(r['spend'], same)} | "
            f"{_ratio(r['spend'], same_sums)} | {r['rss']:.0f} MiB | "
            f"{r['runtime_rss']:.0f} MiB |"
        )
    print(f"\nWhere a steady refresh ({args.batch} new rows) spends its time (medians):\n")
    print("| phase | " + " | ".join(f"{r['rows']:,} rows" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in base["phases"]:
        cells = " | ".join(f"{r['phases'].get(name, float('nan')) * 1000:.1f} ms" for r in results)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
