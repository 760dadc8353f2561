"""/metrics behind TLS and basic auth, secrets kept out of output, SQL never built from strings."""

from __future__ import annotations

import ast
import base64
import http.client
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from exporter.config import ConfigError, load_settings
from exporter.refresh import Refresher
from exporter.server import MetricsServer
from exporter.webconfig import load_web_config
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
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
    return folder


def _web_config(folder: Path, body: str) -> Path:
    path = folder / "web-config.yml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def secured(dsn: str, certs: Path) -> Iterator[tuple[MetricsServer, Refresher, ssl.SSLContext]]:
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


def test_tls_with_right_and_wrong_passwords(secured: tuple) -> None:
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


def test_tls_refuses_clients_that_do_not_trust_it_or_speak_plain_http(secured: tuple) -> None:
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
