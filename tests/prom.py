"""A real Prometheus (Debian's binary) on loopback, and a small client for its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import require_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Query a running Prometheus over its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=at)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(expr)
            except OSError:
                result = []
            if result or time.monotonic() > deadline:
                assert result, f"no result for {expr} after {timeout}s"
                return result
            time.sleep(0.2)


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path) -> None:
    """Wait until a Prometheus-style server at ``url`` answers ``/-/ready``; fail with its log."""
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text()) from None
            time.sleep(0.1)


def _every_interval(rules: Path, tmp: Path) -> Path:
    """A copy of a rules file whose groups all run at the global interval.

    The slow groups (5 minutes in production) then evaluate within a test's seconds; what a
    rule computes does not depend on how often it runs.
    """
    content = yaml.safe_load(rules.read_text(encoding="utf-8"))
    for group in content["groups"]:
        group.pop("interval", None)
    copy = tmp / f"rules-{rules.name}"
    copy.write_text(yaml.safe_dump(content), encoding="utf-8")
    return copy


def create_blocks(openmetrics: Path, storage: Path) -> None:
    """Load an OpenMetrics file with timestamps into a TSDB directory (``promtool``)."""
    blocks = subprocess.run(
        [
            require_binary("promtool"),
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(openmetrics),
            str(storage),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert blocks.returncode == 0, blocks.stderr


@contextmanager
def running_prometheus(
    tmp: Path,
    targets: list[str],
    *,
    rule_files: list[Path] = (),  # type: ignore[assignment]
    scrape_interval: str = "1s",
    storage: Path | None = None,
) -> Iterator[Prometheus]:
    """Run ``prometheus`` scraping ``targets`` (host:port) until the block ends."""
    binary = require_binary("prometheus")
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": "resource-exporter", "static_configs": [{"targets": targets}]}
        ],
        "rule_files": [str(_every_interval(p, tmp)) for p in rule_files],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={storage or tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=3650d",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        wait_ready(prom.url, proc, tmp / "prometheus.log")
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
