"""The server process (exporter/serverprocess.py): it serves what the exporter refreshed,
answers while the exporter's own process holds the GIL, and ends with the exporter, either way
round."""

from __future__ import annotations

import ctypes
import functools
import gc
import gzip
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from exporter.config import Settings, env_var, load_settings
from exporter.server import MetricsServer
from exporter.serverprocess import ServerProcess
from exporter.service import Exporter
from tests.conftest import run_cli
from tests.ledger import Call, Impact, insert, key, parse
from tests.test_cli import wait_for_line
from tests.test_service import get

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="a platform with fork")

NOW = datetime.now(UTC)
SPEND = key("scidex_spend_usd_total", quest="q-a", layer="Forge", provider="bedrock")


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """A server process leaves this process' objects frozen (out of the collector's passes);
    the tests after these collect them again."""
    yield
    gc.unfreeze()


@pytest.fixture
def ledger(dsn: str) -> str:
    insert(
        dsn,
        [Call(NOW - timedelta(hours=1), "t1", cost_usd=Decimal("2.5"))],
        [Impact("t1", 5.0)],
    )
    return dsn


def settings(dsn: str, **values: object) -> Settings:
    """A free loopback port; a refresh at start, then hourly."""
    given = {"dsn": dsn, "port": 0, "listen": "127.0.0.1", "interval_seconds": 3600}
    return load_settings({**given, **values}, env={})


@contextmanager
def exporter(dsn: str, **values: object) -> Iterator[Exporter]:
    """A running exporter, with a server process unless ``values`` say otherwise."""
    running = Exporter(settings(dsn, **{"server_process": True, **values})).start()
    try:
        yield running
    finally:
        running.stop()


def _published(url: str) -> None:
    """Wait until the server serves the first refresh's families (a bounded wait)."""
    deadline = time.monotonic() + 30
    while SPEND not in parse(get(url)[2]) and time.monotonic() < deadline:
        time.sleep(0.02)


def _served(url: str, expected: bytes) -> bytes:
    """The body served once it is ``expected``, or at a deadline: the server process takes a
    snapshot a moment after the parent has sent it."""
    deadline = time.monotonic() + 30
    while (body := get(url)[2]) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return body


def test_the_server_process_serves_each_refreshs_snapshot(ledger: str) -> None:
    gc.unfreeze()
    with exporter(ledger) as running:
        server = running.server
        assert isinstance(server, ServerProcess) and server.pid != os.getpid()
        # What existed before the fork stays out of the collector's passes, whose writes would
        # stop the pages they touch being shared with the server.
        assert gc.get_freeze_count() > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        _published(url)
        for _ in range(2):
            snapshot = running.refresher.snapshot
            assert _served(url, snapshot.text) == snapshot.text
            _, headers, body = get(url, {"Accept-Encoding": "gzip"})
            assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == snapshot.text
            openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
            _, headers, body = get(url, openmetrics)
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            assert body == snapshot.openmetrics
            assert get(url.replace("/metrics", "/-/ready"))[0] == 200
            insert(ledger, [Call(NOW - timedelta(minutes=1), "t3", cost_usd=Decimal("4"))])
            running._refresh()  # what the scheduler runs: a refresh, then the snapshot sent
        served = _served(url, running.refresher.snapshot.text)
        assert parse(served)[SPEND] == 2.5 + 4 + 4


SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as response:
    sys.stdout.buffer.write(response.read())
"""


@pytest.mark.parametrize("apart", [True, False], ids=["server process", "server thread"])
def test_a_scrape_is_answered_while_the_exporters_process_holds_the_gil(
    ledger: str, apart: bool
) -> None:
    """A refresh's Python holds the GIL; here this process holds it throughout a scrape made
    by another process (libc's waitpid called through ctypes.PyDLL keeps the GIL while it
    waits). Only a server in a process of its own can answer."""
    with exporter(ledger, server_process=apart) as running:
        assert isinstance(running.server, ServerProcess) is apart
        url = f"http://127.0.0.1:{running.server.port}/metrics"
        _published(url)
        expected = running.refresher.snapshot.text
        with tempfile.TemporaryFile() as out:
            scraper = subprocess.Popen(
                [sys.executable, "-c", SCRAPE, url, "3"], stdout=out, stderr=subprocess.DEVNULL
            )
            status = ctypes.c_int()
            libc = ctypes.PyDLL(None)  # PyDLL: the GIL is held during the call
            assert libc.waitpid(scraper.pid, ctypes.byref(status), 0) == scraper.pid
            scraper.returncode = os.waitstatus_to_exitcode(status.value)
            out.seek(0)
            body = out.read()
    if apart:
        assert scraper.returncode == 0 and body == expected
    else:  # the thread never got the GIL: the scraper gave up
        assert scraper.returncode != 0 and body == b""


def test_serving_from_a_thread_by_default_and_when_another_thread_runs(
    ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exporter")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with exporter(ledger) as running:
            assert isinstance(running.server, MetricsServer)
    finally:
        release.set()
        other.join()
    assert any("serving from a thread" in r.getMessage() for r in caplog.records)
    caplog.clear()
    running = Exporter(settings(ledger)).start()  # the default
    running.stop()
    assert isinstance(running.server, MetricsServer) and not caplog.records


@pytest.mark.parametrize("apart", [True, False], ids=["server process", "server thread"])
def test_run_until_signal_stops_with_one_line_when_the_server_ends(
    ledger: str, apart: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Liveness is the server's: once it has ended (killed, or its thread gone), the exporter
    stops and says so, instead of refreshing for nobody."""
    caplog.set_level(logging.INFO, logger="exporter")
    running = Exporter(settings(ledger, server_process=apart))
    server = running.server
    end: Callable[[], object] = (
        functools.partial(os.kill, server.pid, signal.SIGKILL)
        if isinstance(server, ServerProcess)
        else functools.partial(server._loop.call_soon_threadsafe, server._loop.stop)
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    timer = threading.Timer(0.5, end)  # once it serves: run_until_signal starts it
    # Should it not notice, a SIGTERM ends it (0), so that the test fails rather than hangs.
    deadline = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    deadline.start()
    try:
        assert running.run_until_signal() == 1
    finally:
        deadline.cancel()
        timer.join()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    (line,) = [r for r in caplog.records if r.getMessage() == "the server stopped serving"]
    assert line.fields == {"exit_code": -signal.SIGKILL if apart else None}  # type: ignore[attr-defined]


APART = {**os.environ, env_var("server_process"): "true"}


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, int]:
    """``resource-exporter serve`` with a server process (no database: none is needed to
    serve); its pid, its server process' pid and port."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "exporter", "serve", "--dsn", f"host={tmp_path} dbname=none"),
            *("--listen", "127.0.0.1", "--port", "0", "--interval", "3600", *args),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=APART,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "msg=serving" in line:
            break
    assert "server_process=True" in line
    port = int(line.split(" port=")[1].split()[0])
    (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return proc, int(child), port


def _gone(pid: int) -> bool:
    """Whether a process has exited (reaped, or a zombie its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_exporter_stops_with_one_line_when_its_server_process_dies(tmp_path: Path) -> None:
    proc, child, port = _serve(tmp_path)
    try:
        assert get(f"http://127.0.0.1:{port}/-/healthy")[0] == 200
        os.kill(child, signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert proc.stderr is not None
        stopped = [line for line in proc.stderr if "the server stopped serving" in line]
        assert len(stopped) == 1 and "exit_code=-9" in stopped[0]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_server_process_ends_with_the_exporter(tmp_path: Path) -> None:
    proc, child, port = _serve(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop it: the socket closes
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(child)
        with pytest.raises(OSError):
            get(f"http://127.0.0.1:{port}/-/healthy")
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_the_server_process_says_why_it_cannot_serve_in_one_line(tmp_path: Path) -> None:
    """What the server process met binding or loading the web config is the exporter's error,
    as when a thread serves (tests/test_cli.py, tests/test_security.py)."""
    dsn = f"host={tmp_path} dbname=none"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--dsn", dsn, "--listen", "127.0.0.1", "--port", str(port), env=APART
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"resource-exporter: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    config = tmp_path / "web.yml"
    config.write_text("basic_auth_users:\n  a: plaintext\n", encoding="utf-8")
    result = run_cli(
        "serve", "--dsn", dsn, "--port", "0", "--web.config.file", str(config), env=APART
    )
    assert result.returncode == 2
    assert "is not a bcrypt hash" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_sighup_reaches_the_server_process(tmp_path: Path) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n", encoding="utf-8")
    proc, child, port = _serve(tmp_path, "--web.config.file", str(config))
    try:
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 401
        proc.send_signal(signal.SIGHUP)  # the file is unchanged: only the signal reloads it
        wait_for_line(proc, 'msg="web config reloaded" users=1', 30, "stderr")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert _gone(child)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
