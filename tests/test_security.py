"""/metrics behind TLS and basic auth, secrets kept out of output, SQL never built from strings."""

from __future__ import annotations

import ast
import base64
import http.client
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from exporter.config import ConfigError, HttpLimits, load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from exporter.webconfig import BasicAuth, load_web_config
from tests.conftest import one, require_binary, run_cli
from tests.wire import ASK_FOR_TEXT, HUGE, read_response, serving, wait_until_paused

ROOT = Path(__file__).resolve().parent.parent


def _make_cert(folder: Path) -> None:
    """A new self-signed certificate and key for 127.0.0.1 in ``folder``, made with openssl."""
    subprocess.run(
        [
            require_binary("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(folder / "server.key"),
            "-out",
            str(folder / "server.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    _make_cert(folder)
    return folder


def _web_config(folder: Path, body: str) -> Path:
    path = folder / "web-config.yml"
    path.write_text(body, encoding="utf-8")
    return path


Secured = tuple[MetricsServer, Refresher, ssl.SSLContext]
"""A TLS server with basic auth, its refresher, and a client context that trusts it."""


@pytest.fixture
def secured(dsn: str, certs: Path) -> Iterator[Secured]:
    hashed = bcrypt.hashpw(b"right horse battery", bcrypt.gensalt(rounds=4)).decode()
    config = _web_config(
        certs,
        "tls_server_config:\n  cert_file: server.crt\n"
        "  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n",
    )
    refresher = Refresher(load_settings({"dsn": dsn}, env={}))
    assert refresher.refresh()
    server = MetricsServer(refresher, "127.0.0.1", 0, web_config=config).start()
    client = ssl.create_default_context(cafile=str(certs / "server.crt"))
    try:
        yield server, refresher, client
    finally:
        server.stop()
        refresher.close()


def _get(
    server: MetricsServer,
    ctx: ssl.SSLContext,
    path: str,
    user: str | None = None,
    password: str = "",
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=5)
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_tls_with_right_and_wrong_passwords(secured: Secured) -> None:
    server, refresher, ctx = secured
    assert server.tls
    status, headers, _ = _get(server, ctx, "/metrics")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="resource-exporter"'
    assert _get(server, ctx, "/metrics", "prometheus", "wrong horse")[0] == 401
    assert _get(server, ctx, "/metrics", "nobody", "right horse battery")[0] == 401
    status, _, body = _get(server, ctx, "/metrics", "prometheus", "right horse battery")
    assert status == 200 and body == refresher.snapshot.text
    # A second scrape hits the cache of successful logins, and still checks the password.
    assert _get(server, ctx, "/metrics", "prometheus", "right horse battery")[0] == 200
    assert _get(server, ctx, "/metrics", "prometheus", "right horse batter")[0] == 401
    assert _get(server, ctx, "/-/healthy")[0] == 200  # liveness stays open for health checks


def test_the_basic_scheme_is_case_insensitive(secured: Secured) -> None:
    server, refresher, ctx = secured
    token = base64.b64encode(b"prometheus:right horse battery").decode()
    for scheme in ("basic", "BASIC", "bAsIc"):
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"{scheme} {token}"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, refresher.snapshot.text), scheme
        finally:
            conn.close()


def test_an_unknown_user_costs_as_much_as_the_costliest_known_one() -> None:
    users = {
        "cheap": bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)).decode(),
        "dear": bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=11)).decode(),
    }
    auth = BasicAuth(users)
    assert auth.dummy[:7] == b"$2b$11$"
    assert bcrypt.checkpw(b"x", auth.dummy) is False  # a valid hash of an unknown password
    assert auth.cached("Basic " + base64.b64encode(b"nobody:b").decode()) is None
    assert not auth.verify("Basic " + base64.b64encode(b"nobody:b").decode())


def test_failed_logins_are_shed_and_do_not_delay_a_known_one(tmp_path: Path) -> None:
    """One bcrypt worker, one place in the queue: a third wrong password at once gets 429,
    and a login that succeeded before is answered while the checks are still running."""
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=13)).decode()  # ~0.5 s a check
    config = _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    source = serving(b"x_usd 1\n")
    limits = HttpLimits(auth_workers=1, auth_queue=1)
    server = MetricsServer(source, "127.0.0.1", 0, web_config=config, limits=limits).start()

    def ask(password: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        token = base64.b64encode(f"prometheus:{password}".encode()).decode()
        sock.sendall(f"GET /metrics HTTP/1.0\r\nAuthorization: Basic {token}\r\n\r\n".encode())
        return sock

    def status(sock: socket.socket) -> int:
        with sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1])

    try:
        assert status(ask("right")) == 200  # checked once, then known
        busy = [ask("wrong"), ask("wrong")]  # the worker and the queue
        deadline = time.monotonic() + 10
        while server.auth_pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.auth_pending == 2
        assert status(ask("wrong")) == 429  # shed, not queued behind bcrypt
        assert status(ask("right")) == 200  # known: answered on the loop
        assert server.auth_pending >= 1  # while the wrong ones are still being checked
        assert [status(sock) for sock in busy] == [401, 401]
    finally:
        server.stop()


def _wait(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert condition()


def test_the_web_config_is_read_again_when_it_or_its_certificate_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """New users and a rotated certificate take effect without a restart; a broken file
    leaves the running configuration as it was."""
    _make_cert(tmp_path)
    tls = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"

    def users(name: str) -> str:
        hashed = bcrypt.hashpw(name.encode(), bcrypt.gensalt(rounds=4)).decode()
        return f"{tls}basic_auth_users:\n  {name}: '{hashed}'\n"

    config = _web_config(tmp_path, users("alice"))
    source = serving(b"x_usd 1\n")
    limits = HttpLimits(idle_timeout_seconds=1.2)  # the files are looked at every 0.2 s
    server = MetricsServer(source, "127.0.0.1", 0, web_config=config, limits=limits).start()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    def status(user: str) -> int:
        return _get(server, ctx, "/metrics", user, user)[0]

    def presented() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            ctx.wrap_socket(raw) as sock,
        ):
            return sock.getpeercert(binary_form=True) or b""

    def der(path: Path) -> bytes:
        return ssl.PEM_cert_to_DER_cert(path.read_text(encoding="utf-8"))

    try:
        assert status("alice") == 200 and status("bob") == 401
        config.write_text(users("bob"), encoding="utf-8")
        _wait(lambda: status("bob") == 200)
        assert status("alice") == 401
        old = presented()
        assert old == der(tmp_path / "server.crt")
        _make_cert(tmp_path)  # rotated in place, the config file untouched
        _wait(lambda: presented() != old)
        assert presented() == der(tmp_path / "server.crt")
        config.write_text("basic_auth_users: [\n", encoding="utf-8")
        _wait(lambda: any(r.getMessage() == "web config not reloaded" for r in caplog.records))
        assert status("bob") == 200  # the last good configuration still serves
    finally:
        server.stop()


def test_tls_clients_that_ask_for_a_large_answer_and_never_read_hold_little(
    certs: Path,
) -> None:
    """Over TLS too, connections that asked for a 16.8 MB text and do not read hold a few
    pieces of it each (Python's allocations while they wait: the encrypted rest of the answer
    in the socket's buffer, before), and reading resumes the answer intact."""
    config = _web_config(
        certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
    )
    source = serving(HUGE)
    source.snapshot.text  # noqa: B018  # decompressed once, before the count
    server = MetricsServer(source, "127.0.0.1", 0, web_config=config).start()
    ctx = ssl.create_default_context(cafile=str(certs / "server.crt"))
    socks: list[ssl.SSLSocket] = []
    tracemalloc.start()
    try:
        for _ in range(4):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(ASK_FOR_TEXT)
            socks.append(sock)
        wait_until_paused(server, 4)
        time.sleep(0.3)
        held, _ = tracemalloc.get_traced_memory()
        assert held < 4 * (1 << 20), held
        headers, body = read_response(socks[0])
        assert "content-encoding" not in headers and body == HUGE
    finally:
        tracemalloc.stop()
        for sock in socks:
            sock.close()
        server.stop()


def _tls_config(pair: str, client_ca: str | None = None) -> str:
    """A web config naming ``pair``/server.crt and .key (relative to it), verifying clients
    against ``client_ca``/server.crt when given."""
    body = f"tls_server_config:\n  cert_file: {pair}/server.crt\n  key_file: {pair}/server.key\n"
    if client_ca is not None:
        body += "  client_auth_type: RequireAndVerifyClientCert\n"
        body += f"  client_ca_file: {client_ca}/server.crt\n"
    return body


def test_no_handshake_fails_while_the_certificate_is_swapped(tmp_path: Path) -> None:
    """Reloads between two certificates while clients connect: every handshake succeeds and
    presents one of the two (loading the files into the listening context failed some)."""
    for pair in ("a", "b"):
        (tmp_path / pair).mkdir()
        _make_cert(tmp_path / pair)
    config = _web_config(tmp_path, _tls_config("a"))
    source = serving(b"x_usd 1\n")
    server = MetricsServer(source, "127.0.0.1", 0, web_config=config).start()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    certificates = {
        ssl.PEM_cert_to_DER_cert((tmp_path / p / "server.crt").read_text(encoding="utf-8")): p
        for p in ("a", "b")
    }
    done = threading.Event()
    reloads = 0

    def swap() -> None:
        nonlocal reloads
        while not done.is_set():
            config.write_text(_tls_config("ab"[reloads % 2]), encoding="utf-8")
            server.reload()
            reloads += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    presented, failed = [], []
    try:
        for _ in range(300):
            try:
                with (
                    socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
                    ctx.wrap_socket(raw) as sock,
                ):
                    presented.append(certificates.get(sock.getpeercert(binary_form=True) or b""))
            except (ssl.SSLError, OSError) as exc:
                failed.append(repr(exc))
    finally:
        done.set()
        swapper.join()
        server.stop()
    assert failed == []
    assert None not in presented and set(presented) == {"a", "b"} and reloads > 10


def test_client_certificates_are_required_and_their_ca_reloaded(tmp_path: Path) -> None:
    """``RequireAndVerifyClientCert`` turned on by a reload: a client without a certificate,
    or with one the CA did not sign, is refused; another CA, then no client certificates,
    take effect at the next handshake."""
    for pair in ("server", "alice", "bob"):
        (tmp_path / pair).mkdir()
        _make_cert(tmp_path / pair)  # self-signed: each client's certificate is its own CA
    config = _web_config(tmp_path, _tls_config("server"))
    source = serving(b"x_usd 1\n")
    server = MetricsServer(source, "127.0.0.1", 0, web_config=config).start()

    def status(client: str | None) -> int | None:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "server" / "server.crt"))
        if client is not None:
            folder = tmp_path / client
            ctx.load_cert_chain(folder / "server.crt", folder / "server.key")
        try:
            return _get(server, ctx, "/metrics")[0]
        except (ssl.SSLError, OSError):  # TLS 1.3 reports the refusal at the first read
            return None

    def reload(client_ca: str | None) -> None:
        config.write_text(_tls_config("server", client_ca), encoding="utf-8")
        server.reload()

    try:
        assert status(None) == 200
        reload("alice")  # the listening context was made without a CA
        _wait(lambda: status(None) is None)
        assert [status(c) for c in ("alice", "bob")] == [200, None]
        reload("bob")
        _wait(lambda: status("bob") == 200)
        assert [status(c) for c in (None, "alice")] == [None, None]
        reload(None)
        _wait(lambda: status(None) == 200)
        assert [status(c) for c in ("alice", "bob")] == [200, 200]
    finally:
        server.stop()


def test_tls_refuses_clients_that_do_not_trust_it_or_speak_plain_http(secured: Secured) -> None:
    server, _, _ = secured
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(server, ssl.create_default_context(), "/metrics")
    plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/metrics")
        plain.getresponse().read()
    plain.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("basic_auth_users:\n  a: plaintext\n", "'basic_auth_users.a' is not a bcrypt hash"),
        # Truncated: every login would fail, with nothing to say why.
        ("basic_auth_users:\n  a: $2y$10$short\n", "'basic_auth_users.a' is not a bcrypt hash"),
        (
            "basic_auth_users:\n  a: $2b$99$" + "a" * 53 + "\n",
            "'basic_auth_users.a' is not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n",
            "cannot load the certificate or key",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n",
            "'tls_server_config.cipher_suites': unknown setting",
        ),
        ("http_server_config:\n  http2: true\n", "'http_server_config': unknown setting"),
        ("tls_server_config: [\n", "not valid YAML"),
    ],
)
def test_bad_web_config_is_refused_by_name(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_web_config(_web_config(tmp_path, body))


def test_serve_refuses_a_bad_web_config_at_start(tmp_path: Path) -> None:
    config = _web_config(tmp_path, "basic_auth_users:\n  a: plaintext\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "serve",
            "--dsn",
            "postgresql://x@127.0.0.1:1/x",
            "--port",
            "0",
            "--web.config.file",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "is not a bcrypt hash" in result.stderr


def test_dsn_password_stays_out_of_metrics_and_logs(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "pw-4c1d-s3cret"
    with_password = dsn.replace("user=postgres", f"user=postgres password={secret}")
    caplog.set_level(logging.DEBUG)
    refresher = Refresher(load_settings({"dsn": with_password}, env={}))
    assert refresher.refresh()
    dead = Refresher(load_settings({"dsn": f"postgresql://u:{secret}@127.0.0.1:1/x"}, env={}))
    assert dead.refresh() is False
    for r in (refresher, dead):
        r.close()
        assert secret.encode() not in r.snapshot.text
    from exporter.logs import LogfmtFormatter

    formatted = "\n".join(LogfmtFormatter().format(r) for r in caplog.records)
    assert "database unavailable" in formatted and secret not in formatted


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql//u:PW-7f3e@127.0.0.1:1/db",  # the scheme lost its colon
        "u:PW-7f3e@127.0.0.1:1",  # no scheme at all
        "host=127.0.0.1 port=1 password=PW-7f3e user",  # conninfo, one key without "="
        "postgresql://u:PW-7f3e@127.0.0.1:notaport/db",
    ],
)
@pytest.mark.parametrize("command", [["check"], ["once"], ["backfill", "--days", "1"]])
def test_a_malformed_dsn_never_prints_its_password(
    dsn: str, command: list[str], tmp_path: Path
) -> None:
    args = [*command, "--dsn", dsn]
    if command[0] == "backfill":
        args += ["--out", str(tmp_path / "out.om")]
    result = run_cli(*args, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip()  # it says what is wrong...
    assert "PW-7f3e" not in result.stdout + result.stderr  # ...without the password


def test_a_dsn_file_keeps_the_connection_string_out_of_the_arguments(
    dsn: str, tmp_path: Path
) -> None:
    secret = tmp_path / "dsn"
    secret.write_text(dsn + "\n", encoding="utf-8")  # as a Docker secret ends
    result = run_cli("check", "--dsn-file", str(secret))
    assert result.returncode == 0, result.stderr
    assert "ledger contract: ok" in result.stdout
    assert "command line" not in result.stderr  # no password given there: no warning
    missing = run_cli("check", "--dsn-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "setting 'dsn_file' (from flag --dsn-file)" in missing.stderr
    assert "No such file" in missing.stderr


def test_a_password_on_the_command_line_is_warned_about_once() -> None:
    result = run_cli("check", "--dsn", "postgresql://u:PW-61aa@127.0.0.1:1/x")
    warnings = [line for line in result.stderr.splitlines() if "on the command line" in line]
    assert len(warnings) == 1 and "--dsn-file" in warnings[0]
    assert "PW-61aa" not in result.stdout + result.stderr


def test_pgpassfile_supplies_the_password_the_dsn_leaves_out(
    own_server: Any, tmp_path: Path
) -> None:
    with psycopg.connect(own_server.dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE reader LOGIN PASSWORD 'pass-9d2e'")
        conn.execute(
            "GRANT SELECT ON cost_ledger, impact_ledger, quest_budget_allocations TO reader"
        )
        (hba,) = one(conn, "SHOW hba_file")
        rules = Path(hba).read_text(encoding="utf-8")
        Path(hba).write_text("local all reader scram-sha-256\n" + rules, encoding="utf-8")
        conn.execute("SELECT pg_reload_conf()")
    params = conninfo_to_dict(own_server.dsn) | {"user": "reader"}
    reader = make_conninfo("", **params)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    refused = run_cli("check", "--dsn", reader, env=env | {"PGPASSFILE": str(tmp_path / "none")})
    assert refused.returncode != 0 and "password" in refused.stderr
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:reader:pass-9d2e\n", encoding="utf-8")
    passfile.chmod(0o600)
    result = run_cli("check", "--dsn", reader, env=env | {"PGPASSFILE": str(passfile)})
    assert result.returncode == 0, result.stderr
    assert "ledger contract: ok" in result.stdout


def _execute_calls(path: Path) -> Iterator[tuple[int, ast.expr]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany", "copy")
            and node.args
        ):
            yield node.lineno, node.args[0]


@pytest.mark.parametrize("path", sorted((ROOT / "exporter").rglob("*.py")), ids=lambda p: p.name)
def test_no_sql_is_built_from_strings_at_run_time(path: Path) -> None:
    """SQL comes from constants (queries.py, schema.sql); values travel as parameters."""
    for line, sql in _execute_calls(path):
        assert not isinstance(sql, ast.JoinedStr), f"{path.name}:{line} f-string SQL"
        assert not isinstance(sql, ast.BinOp), f"{path.name}:{line} SQL built with + or %"
        assert not (
            isinstance(sql, ast.Call)
            and isinstance(sql.func, ast.Attribute)
            and sql.func.attr == "format"
        ), f"{path.name}:{line} SQL built with format"


def test_the_sql_check_sees_the_exporters_queries() -> None:
    calls = [c for p in (ROOT / "exporter").rglob("*.py") for c in _execute_calls(p)]
    assert len(calls) >= 8
