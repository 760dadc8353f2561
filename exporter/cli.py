"""Command line: serve, once, check, generate, demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from exporter import __version__
from exporter.config import ConfigError, Settings, load_settings, unknown_environment
from exporter.logs import event, passwords_in, redact, setup
from exporter.memory import tune_malloc

log = logging.getLogger("exporter.cli")

# Flags that map one-to-one onto settings; everything else is set in the file or environment.
SETTING_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--dsn", "dsn", str, "PostgreSQL connection string (default: $DATABASE_URL)"),
    ("--dsn-file", "dsn_file", Path, "file holding the connection string (keeps it out of ps)"),
    ("--listen", "listen", str, "address to listen on (default 0.0.0.0)"),
    ("--port", "port", int, "port to serve /metrics on (default 9853)"),
    ("--interval", "interval_seconds", float, "seconds between refreshes (default 30)"),
    ("--timezone", "timezone", str, "IANA zone whose calendar days define 'today' (default UTC)"),
    ("--window-days", "window_days", int, "days in the rankings/provider/waste window (30)"),
    ("--grace-hours", "grace_hours", float, "hours before an idle task may count as waste (6)"),
    ("--max-quests", "max_quests", int, "quests that keep their own label (default 50)"),
    ("--statement-timeout", "statement_timeout_seconds", float, "seconds per query (30)"),
    ("--rebuild-timeout", "rebuild_timeout_seconds", float, "seconds per rebuild query (600)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    (
        "--web.config.file",
        "web_config_file",
        Path,
        "web-config.yml with TLS and basic auth for /metrics (exporter-toolkit format)",
    ),
)


DEMO_INTERVAL_SECONDS = 5.0
"""The demo refreshes faster than a real deployment so its numbers visibly move."""


def _settings_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    for flag, dest, kind, text in SETTING_FLAGS:
        parent.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    return parent


def build_parser() -> argparse.ArgumentParser:
    settings = _settings_parser()
    parser = argparse.ArgumentParser(
        prog="resource-exporter",
        description="Export LLM spend, tokens, impact and waste of SciDEX to Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[settings], help="refresh on an interval and serve /metrics")
    sub.add_parser(
        "once",
        parents=[settings],
        help="refresh once and print the exposition; exit 1 if a query failed",
    )
    sub.add_parser(
        "check",
        parents=[settings],
        help="validate the configuration and the ledger contract of the database",
    )
    gen = sub.add_parser("generate", help="load a synthetic ledger into a database")
    gen.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    gen.add_argument("--rows", type=int, required=True, help="number of cost_ledger rows")
    gen.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    gen.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    gen.add_argument(
        "--end",
        type=datetime.fromisoformat,
        default=None,
        help="timestamp of the newest row, ISO 8601 (default: now)",
    )
    gen.add_argument(
        "--task-ids",
        choices=("short", "uuid"),
        default="short",
        help="shape of the task ids: t-<seed>-<n>, or UUIDs made from them (default short)",
    )
    gen.add_argument(
        "--if-empty",
        action="store_true",
        help="do nothing when cost_ledger already has rows (first-start seeding)",
    )
    back = sub.add_parser(
        "backfill",
        parents=[settings],
        help="write the metric history of the ledger as OpenMetrics for promtool",
    )
    back.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    back.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    back.add_argument(
        "--job",
        default="resource-exporter",
        help="the job label Prometheus gives the exporter (default resource-exporter)",
    )
    back.add_argument(
        "--instance",
        default="exporter:9853",
        help="the instance label of the exporter's target (default exporter:9853)",
    )
    demo = sub.add_parser(
        "demo",
        parents=[settings],
        help="embedded PostgreSQL + synthetic ledger + live spend + /metrics",
    )
    demo.add_argument("--rows", type=int, default=200_000, help="ledger size (default 200000)")
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the demo database here (default: a temporary directory)",
    )
    demo.add_argument(
        "--append-every",
        type=float,
        default=5.0,
        help="seconds between batches of new spend (default 5)",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags = {dest: getattr(args, dest) for _, dest, _, _ in SETTING_FLAGS}
    names = {dest: flag for flag, dest, _, _ in SETTING_FLAGS}
    return load_settings(flags, config_file=args.config, flag_names=names)


def _serve(settings: Settings) -> int:
    from exporter.service import Exporter

    settings.dsn_value()
    try:
        exporter = Exporter(settings)
    except OSError as exc:  # the port is taken, or the address is not this host's
        where = f"[{settings.listen}]" if ":" in settings.listen else settings.listen
        errno = exc.errno or 0  # asyncio wraps the system's message in a longer one
        reason = os.strerror(errno) if errno > 0 else (exc.strerror or str(exc))
        raise ConfigError(f"cannot listen on {where}:{settings.port}: {reason}") from None
    code = exporter.run_until_signal()
    # A refresh stuck in a connection attempt (a host that does not answer) would hold the
    # process for the rest of its connect timeout, and log after "stopped": leave now.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _once(settings: Settings) -> int:
    from exporter.refresh import Refresher

    settings.dsn_value()
    refresher = Refresher(settings)
    ok = refresher.refresh()
    refresher.close()
    sys.stdout.buffer.write(refresher.snapshot.text)
    return 0 if ok else 1


def _check(settings: Settings) -> int:
    from exporter.contract import check_relations, performance_advice
    from exporter.refresh import connect

    if settings.web_config_file is not None:
        from exporter.webconfig import load_web_config

        load_web_config(settings.web_config_file)
    print("configuration: ok")
    try:
        with connect(settings) as conn:  # the exporter's own session: read-only, UTF-8 text
            notes: list[str] = []
            problems = check_relations(conn, notes)
            advice = [] if problems else performance_advice(conn)
    except psycopg.Error as exc:
        print(f"database: cannot connect: {redact(str(exc).strip())}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"ledger contract: {problem}", file=sys.stderr)
    if not problems:
        print("ledger contract: ok")
    for note in notes:
        print(f"ledger contract: {note}")  # information, not a failure
    for line in advice:
        print(f"ledger performance: {line}")  # advice, not a failure
    return 1 if problems else 0


def _generate(args: argparse.Namespace) -> int:
    from exporter import generate

    if args.rows < 0:
        raise ConfigError("--rows must be >= 0")
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        if args.if_empty and generate.has_rows(conn):
            print("cost_ledger already has rows; nothing loaded")
            return 0
        progress = generate.Progress(args.rows) if args.rows >= 100_000 else None
        p = generate.load(
            conn,
            args.rows,
            seed=args.seed,
            end=args.end,
            days=args.days,
            progress=progress.update if progress else None,
            task_ids=args.task_ids,
        )
    print(f"loaded {args.rows:,} cost rows, {len(p.tasks):,} tasks, {len(p.quests)} quests")
    return 0


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from exporter.backfill import backfill

    settings.dsn_value()
    if not 1 <= args.days <= 3660:
        raise ConfigError("--days must be between 1 and 3660")
    if args.out is None:
        summary = backfill(settings, args.days, sys.stdout, job=args.job, instance=args.instance)
    else:
        with args.out.open("w", encoding="utf-8") as out:
            summary = backfill(settings, args.days, out, job=args.job, instance=args.instance)
    print(
        f"backfilled {summary.series:,} series, {summary.samples:,} samples from "
        f"{summary.start:%Y-%m-%d %H:%M} to {summary.end:%Y-%m-%d %H:%M} UTC",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from exporter import demo

    if args.interval_seconds is None:
        settings = settings.model_copy(update={"interval_seconds": DEMO_INTERVAL_SECONDS})
    return demo.run(settings, args.rows, args.data_dir, args.append_every)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: psycopg cancels a running query on the server for both."""


def _terminate(signum: int, _: FrameType | None) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    tune_malloc()  # before anything large is allocated, and before any thread starts
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # serve stops cleanly on its own
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "generate":
            setup("INFO")
            return _generate(args)
        settings = _settings(args)
        setup(settings.log_level)
        for name in unknown_environment():
            event(log, logging.WARNING, "unknown environment variable ignored", variable=name)
        if getattr(args, "dsn", None) and passwords_in(args.dsn):
            event(
                log,
                logging.WARNING,
                "a password on the command line can be read by other users (ps, /proc):"
                " use --dsn-file, PGPASSFILE or DATABASE_URL",
            )
        handlers: dict[str, Any] = {
            "serve": lambda: _serve(settings),
            "once": lambda: _once(settings),
            "check": lambda: _check(settings),
            "demo": lambda: _demo(args, settings),
            "backfill": lambda: _backfill(args, settings),
        }
        return int(handlers[args.command]())
    except ConfigError as exc:
        print(f"resource-exporter: {redact(str(exc))}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"resource-exporter: database error: {redact(str(exc).strip())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the query was cancelled
        terminated = isinstance(exc, _Terminated)
        print(
            f"resource-exporter: {'terminated' if terminated else 'interrupted'}", file=sys.stderr
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
