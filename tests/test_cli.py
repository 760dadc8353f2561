"""The command line, run as a real process."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from exporter import generate
from exporter.cli import build_parser
from tests.conftest import assert_promtool_clean, one, run_cli, temporary_database
from tests.ledger import Sample, key, parse, relax

END = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={**os.environ, **(env or {})}, timeout=timeout)


@contextmanager
def spawn(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Run the CLI in the background; kill it if the test left it running."""
    with subprocess.Popen(
        [sys.executable, "-m", "exporter", *args],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_interruptible,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def _interruptible() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C delivers it, even when the tests run as a
    background job without job control (which starts them with SIGINT ignored, inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_line(
    proc: subprocess.Popen[str], pattern: str, timeout: float = 60, stream: str = "stdout"
) -> re.Match[str]:
    """The first line of the process's ``stream`` that matches ``pattern``. A thread reads it,
    so a process that prints nothing fails the test at the deadline instead of blocking it.
    The thread stops after the match: the stream can be read on afterwards."""
    pipe = getattr(proc, stream)
    assert pipe is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in pipe:
            lines.put(line)
            if re.search(pattern, line):
                return
        lines.put(None)  # the end of the stream

    threading.Thread(target=read, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            break
        if match := re.search(pattern, line):
            return match
        seen.append(line)
    proc.kill()
    other = proc.stderr if stream == "stdout" else None
    raise AssertionError(
        f"no {stream} line matching {pattern!r} within {timeout} s; last lines: {seen[-10:]}"
        + (f"; stderr: {other.read()}" if other is not None else "")
    )


def scrape(url: str) -> dict[Sample, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return parse(resp.read())


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_generate_loads_the_requested_rows_deterministically(empty_dsn: str) -> None:
    result = cli("generate", "--dsn", empty_dsn, "--rows", "3000", "--end", END.isoformat())
    assert result.returncode == 0, result.stderr
    assert "loaded 3,000 cost rows" in result.stdout
    with psycopg.connect(empty_dsn) as conn:
        stats = one(
            conn,
            "SELECT count(*), count(DISTINCT quest), count(DISTINCT layer), max(ts),"
            " count(*) FILTER (WHERE cost_usd = 0), count(DISTINCT provider)"
            " FROM cost_ledger",
        )
        budgets = one(conn, "SELECT count(DISTINCT day) FROM quest_budget_allocations")
        digest = one(
            conn,
            "SELECT md5(string_agg(task_id || cost_usd::text, ',' ORDER BY id)) FROM cost_ledger",
        )
    count, quests, layers, newest, free_calls, providers = stats
    assert count == 3000 and layers == 5 and 20 <= quests <= 30 and newest <= END
    assert free_calls > 0 and providers == 10
    assert budgets == (31,)
    # The same seed gives the same ledger.
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE cost_ledger, impact_ledger, quest_budget_allocations")
    assert (
        cli("generate", "--dsn", empty_dsn, "--rows", "3000", "--end", END.isoformat()).returncode
        == 0
    )
    with psycopg.connect(empty_dsn) as conn:
        assert (
            conn.execute(
                "SELECT md5(string_agg(task_id || cost_usd::text, ',' ORDER BY id))"
                " FROM cost_ledger"
            ).fetchone()
            == digest
        )


def test_generate_offers_every_shape_of_task_ids() -> None:
    """The command line names the shapes itself (it does not import the generator to serve)."""
    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    (task_ids,) = (a for a in commands.choices["generate"]._actions if a.dest == "task_ids")
    assert tuple(task_ids.choices or ()) == generate.TASK_IDS


def test_generate_makes_uuid_task_ids_of_the_same_ledger(empty_dsn: str) -> None:
    """``--task-ids uuid``: the same ledger, each task id a canonical version-4 UUID (one per
    task, the impacts' the same), every other column as with the short ids."""
    args = ("generate", "--dsn", empty_dsn, "--rows", "3000", "--end", END.isoformat())
    tables = "TRUNCATE cost_ledger, impact_ledger, quest_budget_allocations"
    rest = (
        "SELECT md5(string_agg(concat_ws('|', ts, quest, layer, provider, model, cost_usd),"
        " ',' ORDER BY id)), count(DISTINCT task_id) FROM cost_ledger"
    )
    assert cli(*args).returncode == 0
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        short = one(conn, rest)
        short_impacts = one(conn, "SELECT count(*), sum(impact_score) FROM impact_ledger")
        conn.execute(tables)
    result = cli(*args, "--task-ids", "uuid")
    assert result.returncode == 0, result.stderr
    uuid4 = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
    with psycopg.connect(empty_dsn) as conn:
        assert one(conn, rest) == short
        assert one(conn, "SELECT count(*), sum(impact_score) FROM impact_ledger") == short_impacts
        assert one(conn, "SELECT count(*) FROM cost_ledger WHERE task_id !~ %s", [uuid4]) == (0,)
        orphans = "SELECT count(*) FROM impact_ledger i WHERE NOT EXISTS"
        orphans += " (SELECT FROM cost_ledger c WHERE c.task_id = i.task_id)"
        assert one(conn, orphans) == (0,)


def test_once_prints_a_promtool_clean_exposition(empty_dsn: str, tmp_path: Path) -> None:
    assert cli("generate", "--dsn", empty_dsn, "--rows", "20000").returncode == 0
    result = cli("once", "--dsn", empty_dsn)
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout.encode())
    assert samples[key("scidex_exporter_query_success", query="window_tasks")] == 1
    with psycopg.connect(empty_dsn) as conn:
        total = one(conn, "SELECT sum(cost_usd) FROM cost_ledger")[0]
    spend = sum(v for k, v in samples.items() if k[0] == "scidex_spend_usd_total")
    assert spend == pytest.approx(float(total), rel=1e-9)
    assert_promtool_clean(result.stdout.encode())


def test_once_on_a_hostile_ledger_is_promtool_clean(dsn: str) -> None:
    relax(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cost_ledger (ts, task_id, quest, layer, provider, input_tokens,"
            " output_tokens, cost_usd) VALUES"
            " (now() - interval '8 hours', E'ta\\\\sk\"\\n', E'q\\\\\"\\n\\t', '',"
            "  NULL, 5000, 0, 1),"
            " (now(), repeat('t', 10000), repeat('🚀', 5000), E'\\u202eevil', 'x', 1, 1, 'NaN')"
        )
    result = cli("once", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert_promtool_clean(result.stdout.encode())
    samples = parse(result.stdout.encode())
    assert (
        samples[key("scidex_task_wasted_tokens", task_id='ta\\sk"', quest='q\\"', layer="unknown")]
        == 5000
    )


def test_once_exits_non_zero_when_a_query_fails(empty_dsn: str) -> None:
    result = cli("once", "--dsn", empty_dsn)
    assert result.returncode == 1
    assert 'scidex_exporter_query_success{query="spend_totals"} 0.0' in result.stdout
    assert re.search(
        r'msg="query failed" query=spend_totals failures=1 error_kind=UndefinedTable '
        r'error="relation \\"cost_ledger\\" does not exist" '
        r'contract="cost_ledger: relation does not exist \(create it or a view\);',
        result.stderr,
    )


def test_check_accepts_the_shipped_schema(dsn: str) -> None:
    result = cli("check", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "ledger contract: ok" in result.stdout
    assert "ledger performance" not in result.stdout


def test_check_reads_a_sql_ascii_database_s_names_as_text(pg_server: str) -> None:
    # psycopg hands a SQL_ASCII database's text over as bytes: every column read as missing.
    with temporary_database(pg_server, schema=True, encoding="SQL_ASCII") as dsn:
        result = cli("check", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert "ledger contract: ok" in result.stdout


def test_check_says_which_index_or_statistics_the_ledger_lacks(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX cost_ledger_task_ts_idx")
        conn.execute("DROP STATISTICS cost_ledger_task_provider_model_stats")
    result = cli("check", "--dsn", dsn)
    assert result.returncode == 0, result.stderr  # advice, not a failure
    advice = [line for line in result.stdout.splitlines() if "ledger performance" in line]
    assert len(advice) == 2
    assert "cost_ledger (task_id, ts)" in advice[0] and "(task_id, provider, model)" in advice[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE cost_ledger DROP CONSTRAINT cost_ledger_pkey")
    result = cli("check", "--dsn", dsn)
    advice = [line for line in result.stdout.splitlines() if "ledger performance" in line]
    assert len(advice) == 3 and "cost_ledger (id)" in advice[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX cost_ledger_ts_idx")
        conn.execute("ALTER TABLE cost_ledger RENAME TO ledger_base")
        conn.execute("CREATE VIEW cost_ledger AS SELECT * FROM ledger_base")
    result = cli("check", "--dsn", dsn)
    assert result.returncode == 0 and "ledger performance" not in result.stdout  # a view
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX impact_ledger_measured_at_idx")
    result = cli("check", "--dsn", dsn)
    (line,) = [line for line in result.stdout.splitlines() if "ledger performance" in line]
    assert "impact_ledger (measured_at)" in line


def test_check_says_when_the_task_index_does_not_cover_the_lookup(dsn: str) -> None:
    # The index of an earlier schema: without the model and the optional token columns.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX cost_ledger_task_ts_idx")
        conn.execute(
            "CREATE INDEX cost_ledger_task_ts_idx ON cost_ledger (task_id, ts)"
            " INCLUDE (provider, cost_usd, input_tokens, output_tokens)"
        )
    result = cli("check", "--dsn", dsn)
    assert result.returncode == 0, result.stderr  # advice, not a failure
    (advice,) = [line for line in result.stdout.splitlines() if "ledger performance" in line]
    assert "does not INCLUDE every column" in advice and "recreate it" in advice


def test_check_names_each_problem(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE spend (id int, ts timestamp, task_id uuid, quest text,"
            " layer text, provider text, input_tokens int, output_tokens int,"
            " cost_usd text)"
        )
        conn.execute("CREATE VIEW cost_ledger AS SELECT * FROM spend")
        conn.execute(
            "CREATE TABLE quest_budget_allocations (quest text, day date, allocated_usd numeric)"
        )
    result = cli("check", "--dsn", empty_dsn)
    assert result.returncode == 1
    problems = [line.removeprefix("ledger contract: ") for line in result.stderr.splitlines()]
    assert problems == [
        "cost_ledger.ts: type timestamp without time zone is not one of timestamp with time zone",
        "cost_ledger.task_id: type uuid is not one of text, character varying, character"
        " (a view can cast it: task_id::text)",
        "cost_ledger.model: column is missing",
        "cost_ledger.cost_usd: type text is not one of numeric, double precision, real, bigint,"
        " integer, smallint",
        "impact_ledger: relation does not exist (create it or a view)",
    ]


def test_bad_configuration_exits_2_naming_the_setting() -> None:
    result = cli("serve", "--dsn", "postgresql://x@y/z", "--interval", "0")
    assert result.returncode == 2
    assert "setting 'interval_seconds' (from flag --interval)" in result.stderr
    result = cli("serve", env={"DATABASE_URL": ""})
    assert result.returncode == 2 and "--dsn or set DATABASE_URL" in result.stderr


def test_password_never_reaches_output() -> None:
    dsn = "postgresql://alice:s3cr3t-pw@127.0.0.1:1/ledger?connect_timeout=1"
    result = cli("once", "--dsn", dsn)
    assert result.returncode == 1
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    assert "database unavailable" in result.stderr
    assert "s3cr3t-pw" not in cli("check", "--dsn", dsn).stderr
    help_text = cli("serve", "--help", env={"DATABASE_URL": dsn}).stdout
    assert "--dsn" in help_text and "s3cr3t-pw" not in help_text


def test_serve_stops_cleanly_on_sigterm(dsn: str) -> None:
    with spawn(
        "serve",
        "--dsn",
        dsn,
        "--port",
        "0",
        "--listen",
        "127.0.0.1",
        "--interval",
        "0.5",
        "--log-level",
        "INFO",
    ) as proc:
        port = int(wait_for_line(proc, r"msg=serving .* port=(\d+)", 30, "stderr").group(1))
        deadline = time.monotonic() + 10
        samples: dict[Sample, float] = {}
        while time.monotonic() < deadline:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
            if samples.get(key("scidex_exporter_refreshes_total"), 0) >= 1:
                break
            time.sleep(0.1)
        assert samples[key("scidex_exporter_query_success", query="window_tasks")] == 1
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
    with psycopg.connect(dsn) as conn:
        left = one(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'resource-exporter'",
        )
    assert left == (0,)


def test_demo_serves_moving_numbers_and_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    with spawn(
        "demo",
        "--rows",
        "20000",
        "--port",
        "0",
        "--listen",
        "127.0.0.1",
        "--interval",
        "0.5",
        "--append-every",
        "0.3",
        "--data-dir",
        str(data),
    ) as proc:
        url = wait_for_line(proc, r"scrape (http://\S+/metrics)").group(1)
        spent: list[float] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(spent) < 2 or spent[-1] <= spent[0]):
            samples = scrape(url)
            total = sum(v for k, v in samples.items() if k[0] == "scidex_spend_usd_total")
            if total:
                spent.append(total)
            time.sleep(0.3)
        assert len(spent) >= 2 and spent[-1] > spent[0], spent
        with urllib.request.urlopen(url, timeout=5) as resp:
            exposition = resp.read()
        assert_promtool_clean(exposition)
        assert processes_mentioning(str(data / "pgdata"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    assert processes_mentioning(str(data / "pgdata")) == []


def test_a_taken_port_or_a_foreign_address_is_one_line_not_a_traceback(dsn: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--dsn", dsn, "--listen", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"resource-exporter: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    # TEST-NET-3 (RFC 5737): no host has it, so it cannot be bound here.
    result = cli("serve", "--dsn", dsn, "--listen", "203.0.113.7", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("resource-exporter: cannot listen on 203.0.113.7:0: ")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_unknown_variable_with_the_prefix_is_warned_about(dsn: str) -> None:
    result = cli("check", "--dsn", dsn, env={"RESOURCE_EXPORTER_INTERVAL": "5"})
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "unknown environment variable" in x]
    assert "RESOURCE_EXPORTER_INTERVAL_SECONDS" in line  # the likely meaning


def _waiting_queries(dsn: str, on_lock: bool = False) -> int:
    """The exporter's running queries (``on_lock``: only those waiting for a lock)."""
    with psycopg.connect(dsn) as conn:
        (n,) = one(
            conn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'resource-exporter' AND state = 'active'"
            " AND (NOT %s OR wait_event_type = 'Lock')",
            [on_lock],
        )
    return int(n)


@pytest.mark.parametrize(
    ("sig", "word", "code"),
    [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)],
)
def test_once_stopped_mid_query_cancels_it_and_says_so_in_one_line(
    dsn: str, sig: signal.Signals, word: str, code: int
) -> None:
    blocker = psycopg.connect(dsn)
    blocker.execute(
        "LOCK TABLE cost_ledger, impact_ledger, quest_budget_allocations IN ACCESS EXCLUSIVE MODE"
    )
    try:
        with spawn("once", "--dsn", dsn, "--statement-timeout", "120") as proc:
            # A query that is merely running (a short one before the blocked one) is not yet
            # the moment to stop it.
            deadline = time.monotonic() + 30
            while _waiting_queries(dsn, on_lock=True) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _waiting_queries(dsn, on_lock=True) == 1  # blocked behind the lock
            proc.send_signal(sig)
            assert proc.wait(timeout=10) == code
            assert proc.stderr is not None
            assert proc.stderr.read().strip().splitlines() == [f"resource-exporter: {word}"]
        deadline = time.monotonic() + 10
        while _waiting_queries(dsn) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _waiting_queries(dsn) == 0  # cancelled on the server, not left running
    finally:
        blocker.close()


def test_serve_stops_within_seconds_while_a_connection_attempt_hangs() -> None:
    import socket
    import threading

    with socket.socket() as silent:  # accepts, and never says a word: libpq waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
        dsn = f"host=127.0.0.1 port={port} dbname=x user=x"
        env = {"RESOURCE_EXPORTER_CONNECT_TIMEOUT_SECONDS": "60"}
        with subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--dsn", dsn, "--port", "0"],
            text=True,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        ) as proc:
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert accepted  # the refresh is in its connection attempt
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0  # the connect timeout is 60 s
            lines = proc.stderr.read().strip().splitlines()
        for conn in accepted:
            conn.close()
    assert "msg=stopped" in lines[-1]  # and nothing after it
    assert not any("database unavailable" in line for line in lines)


def test_sighup_reads_the_web_config_again(dsn: str, tmp_path: Path) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n", encoding="utf-8")
    with spawn(
        "serve", "--dsn", dsn, "--port", "0", "--listen", "127.0.0.1",
        "--web.config.file", str(config),
    ) as proc:  # fmt: skip
        wait_for_line(proc, "msg=serving", 30, "stderr")
        proc.send_signal(signal.SIGHUP)  # the file is unchanged: only the signal reloads it
        wait_for_line(proc, 'msg="web config reloaded" users=1', 30, "stderr")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
