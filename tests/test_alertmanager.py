"""The example Alertmanager configuration, run by a real Alertmanager: grouping, inhibition,
delivery to the webhook sink."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary
from tests.prom import free_port, wait_ready

CONFIG = (
    Path(__file__).resolve().parent.parent / "provisioning" / "alertmanager" / "alertmanager.yml"
)


class Sink(ThreadingHTTPServer):
    """The compose stack's webhook-sink: records every notification by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@contextmanager
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, Sink]]:
    """The example configuration with the sink's address (and short waits) for the test."""
    sink = Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    text = CONFIG.read_text(encoding="utf-8").replace(
        "http://webhook-sink:8080", f"http://127.0.0.1:{sink.server_address[1]}"
    )
    config = yaml.safe_load(text)
    config["route"]["group_wait"] = "1s"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = tmp_path / "alertmanager.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            require_binary("prometheus-alertmanager"),
            f"--config.file={path}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path)
        yield url, sink
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        sink.shutdown()
        sink.server_close()
        log.close()


def _alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {"summary": name},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(hours=1)).isoformat(),
    }


def _names(group: dict[str, Any]) -> list[str]:
    return sorted(a["labels"]["alertname"] for a in group["alerts"])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_warnings_of_a_paged_quest_are_inhibited_and_the_rest_is_delivered(
    tmp_path: Path,
) -> None:
    alerts = [
        _alert("QuestOverBudget", "critical", quest="paged", period="day"),
        _alert("QuestBudgetThreshold", "warning", quest="paged", period="month", threshold="90%"),
        _alert("QuestBudgetThreshold", "warning", quest="calm", period="day", threshold="80%"),
        _alert("QuestSpendAnomaly", "warning", quest="calm"),
        _alert("ProviderSpendSpike", "warning", provider="bedrock"),
        _alert("ResourceExporterDown", "critical", job="resource-exporter"),
        _alert("ResourceExporterStale", "warning", job="resource-exporter"),
    ]
    with alertmanager(tmp_path) as (url, sink):
        request = urllib.request.Request(
            f"{url}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = {
                a["labels"]["alertname"] + "/" + a["labels"].get("quest", ""): a["status"]
                for a in _get(f"{url}/api/v2/alerts")
            }
            delivered = {
                (path, a["labels"]["alertname"], a["labels"].get("quest", ""))
                for path, body in sink.received
                for a in body["alerts"]
            }
            if len(state) == len(alerts) and len(delivered) >= 5:
                break
            time.sleep(0.3)
        groups = {
            tuple(sorted(g["labels"].items())): sorted(
                a["labels"]["alertname"] for a in g["alerts"]
            )
            for g in _get(f"{url}/api/v2/alerts/groups")
        }

    # The critical of quest "paged" inhibits its warning; nothing else is inhibited.
    assert state["QuestBudgetThreshold/paged"]["state"] == "suppressed"
    assert state["QuestBudgetThreshold/paged"]["inhibitedBy"]
    assert state["ResourceExporterStale/"]["state"] == "suppressed"
    for name in ("QuestOverBudget/paged", "QuestBudgetThreshold/calm", "QuestSpendAnomaly/calm"):
        assert state[name]["state"] == "active", name
    assert state["ProviderSpendSpike/"]["state"] == "active"
    # Grouped by quest (and provider): one notification per quest.
    assert groups[(("quest", "calm"),)] == ["QuestBudgetThreshold", "QuestSpendAnomaly"]
    assert groups[(("provider", "bedrock"),)] == ["ProviderSpendSpike"]
    # Pages go to their own receiver, the rest to the sink's alerts; inhibited ones nowhere.
    assert delivered == {
        ("/pages", "QuestOverBudget", "paged"),
        ("/pages", "ResourceExporterDown", ""),
        ("/alerts", "QuestBudgetThreshold", "calm"),
        ("/alerts", "QuestSpendAnomaly", "calm"),
        ("/alerts", "ProviderSpendSpike", ""),
    }


@pytest.mark.parametrize("receiver", ["webhook-sink", "pages"])
def test_every_receiver_points_at_the_compose_webhook_sink(receiver: str) -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    (found,) = [r for r in config["receivers"] if r["name"] == receiver]
    assert all(w["url"].startswith("http://webhook-sink:8080/") for w in found["webhook_configs"])
