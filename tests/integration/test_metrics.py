"""/metrics of a real node, parsed with prometheus-client's parser: names, labels and values
follow the node (kill -9 included), and every metric deploy/ queries is in the scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support import Node, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "comfy-machine.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\bcomfy_machine_[a-z0-9_]+")


class Scrape:
    """One GET /metrics, parsed."""

    def __init__(self, node: Node) -> None:
        with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:
            self.content_type = resp.headers["Content-Type"]
            text = resp.read().decode()
        self.names: set[str] = set()
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            # A family without samples (a placeholder) still exists: HELP and TYPE are there.
            self.names.add(family.name + "_total" if family.type == "counter" else family.name)
            self.names.update(s.name for s in family.samples)
            self.samples.extend(family.samples)

    def find(self, metric: str, /, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, metric: str, /, **labels: str) -> float:
        found = self.find(metric, **labels)
        assert len(found) == 1, (metric, labels, found)
        return found[0].value


def key(inst: dict) -> dict[str, str]:
    return {"gpu": str(inst["gpu"]), "name": inst["name"], "port": str(inst["port"])}


def test_scrape_follows_the_node_and_a_kill_9(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    body = node.wait_ready()
    scrape = Scrape(node)
    assert scrape.content_type.startswith("text/plain")
    assert scrape.value("comfy_machine_phase", phase="READY") == 1
    assert sum(s.value for s in scrape.find("comfy_machine_phase")) == 1
    assert scrape.value("comfy_machine_supervisor_up") == 1
    build = scrape.find("comfy_machine_build_info")[0]
    assert build.labels["version"] == metadata.version("comfy-machine")
    _, installation = node.get("/health/comfyui/installation")
    assert installation["steps"]
    for step in installation["steps"]:
        status = scrape.find("comfy_machine_install_step_status", step=step["name"])
        assert [s.labels["status"] for s in status if s.value == 1] == [step["status"]]
        duration = scrape.value("comfy_machine_install_step_duration_seconds", step=step["name"])
        assert duration == step["duration_s"]
    for inst in body["instances"]:
        labels = key(inst)
        assert scrape.value("comfy_machine_instance_ready", **labels) == 1
        assert scrape.value("comfy_machine_instance_accepting", **labels) == 1
        assert scrape.value("comfy_machine_instance_restarts_total", **labels) == 0
        assert scrape.value("comfy_machine_instance_queue_pending", **labels) == 0
        assert scrape.value("comfy_machine_instance_queue_running", **labels) == 0
        assert scrape.value("comfy_machine_smoke_passed", **labels) == 1
        assert (
            scrape.value("comfy_machine_smoke_duration_seconds", **labels)
            == (inst["smoke"]["duration_s"])
        )
        assert scrape.value("comfy_machine_probe_success", **labels) == 1
        assert 0 < scrape.value("comfy_machine_probe_duration_seconds", **labels) < 5
        assert (
            scrape.value("comfy_machine_instance_start_time_seconds", **labels)
            == (inst["started_at"])
        )
        state = scrape.find("comfy_machine_instance_state", **labels)
        assert [s.labels["state"] for s in state if s.value == 1] == [inst["state"]]
        # CPU slots are planned GPUs: quarantine exists at 0 (no Xid counters: not a GPU).
        assert (
            scrape.value("comfy_machine_gpu_quarantined", gpu=labels["gpu"], uuid=inst["gpu_uuid"])
            == 0
        )
    assert not scrape.find("comfy_machine_gpu_xid_errors_total")
    assert scrape.value("comfy_machine_download_bytes_total") == 0

    victim = body["instances"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def dropped() -> Scrape | None:
        s = Scrape(node)
        return s if s.value("comfy_machine_instance_ready", **key(victim)) == 0 else None

    down = wait_until(dropped, 5, "instance_ready of gpu 1 to drop to 0")
    # One scrape reads one state: the node is degraded in the very scrape that shows gpu 1 down.
    assert down.value("comfy_machine_phase", phase="DEGRADED") == 1
    assert down.value("comfy_machine_instance_ready", **key(body["instances"][0])) == 1

    def back() -> Scrape | None:
        s = Scrape(node)
        labels = key(victim)
        ready = s.value("comfy_machine_instance_ready", **labels) == 1
        return (
            s if ready and s.value("comfy_machine_instance_restarts_total", **labels) >= 1 else None
        )

    again = wait_until(back, 60, "gpu 1 ready again with restarts_total >= 1")
    assert again.value("comfy_machine_phase", phase="READY") == 1
    assert again.value("comfy_machine_instance_restarts_total", **key(body["instances"][0])) == 0
    assert (
        again.value("comfy_machine_instance_start_time_seconds", **key(victim))
        > (victim["started_at"])
    )
    _, after = node.instance(1)
    assert again.value("comfy_machine_instance_restarts_total", **key(victim)) == after["restarts"]


def _dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ("expr", "definition", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_dashboard_and_alert_rules_query_only_exposed_metrics(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1).start()
    node.wait_ready()
    exposed = Scrape(node).names
    dashboard = {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
    assert len(dashboard) >= 20
    assert dashboard <= exposed, f"queried but not exposed: {sorted(dashboard - exposed)}"
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {m for r in rules for m in METRIC.findall(r["expr"])}
    assert used <= exposed, f"in the rules but not exposed: {sorted(used - exposed)}"
    alerts = {r["alert"]: r for r in rules}
    for wanted in (
        "ComfyMachineInstanceNotReady",
        "ComfyMachineInstanceCrashLooping",
        "ComfyMachineGpuQuarantined",
        "ComfyMachineInstallFailed",
        "ComfyMachineRequiredModelMissing",
        "ComfyMachineGpuTemperatureHigh",
    ):
        assert wanted in alerts
        assert alerts[wanted]["labels"]["severity"] in ("warning", "critical")
        assert alerts[wanted]["annotations"]["summary"]
    assert alerts["ComfyMachineInstanceNotReady"]["for"] == "2m"
