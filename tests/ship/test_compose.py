"""deploy/compose: a 2-GPU host with Prometheus scraping the node, parsed and cross-checked."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from tests.ship.recipes import (
    DEPLOY,
    HEALTH_PORT,
    IMAGE,
    PORT_START,
    ROOT,
    check_settings,
    healthcheck_command,
    load_yaml,
)

COMPOSE = DEPLOY / "compose" / "compose.yaml"
GPUS = 2


def services() -> dict[str, Any]:
    return load_yaml(COMPOSE)["services"]


def node() -> dict[str, Any]:
    return services()["comfy-machine"]


def test_node_service_reserves_two_nvidia_gpus() -> None:
    service = node()
    assert service["image"] == IMAGE
    assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": GPUS, "capabilities": ["gpu"]}
    env = service["environment"]
    assert int(env["NUM_GPUS"]) == GPUS
    assert env["COMFYUI_LISTEN"] == "0.0.0.0"
    check_settings(env, "compose.yaml")


def test_node_service_publishes_health_and_one_port_per_gpu() -> None:
    env = node()["environment"]
    health, start = int(env["MACHINE_HEALTH_PORT"]), int(env["COMFYUI_PORT_START"])
    assert (health, start) == (HEALTH_PORT, PORT_START)
    last = start + GPUS - 1
    assert node()["ports"] == [f"{health}:{health}", f"{start}-{last}:{start}-{last}"]


def test_node_service_keeps_its_workspace_and_checks_livez() -> None:
    compose = load_yaml(COMPOSE)
    service = node()
    volume, _, path = service["volumes"][0].partition(":")
    assert path == "/workspace" and volume in compose["volumes"]
    check = service["healthcheck"]
    assert check["test"] == ["CMD", *healthcheck_command()]  # the image's own, spelled out
    assert "/livez" in check["test"][-1]
    assert check["start_period"] == "10m"


def test_prometheus_scrapes_the_node_service_on_its_health_port() -> None:
    prometheus = services()["prometheus"]
    mounts = dict(v.split(":", 1) for v in prometheus["volumes"] if v.startswith("./"))
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml:ro"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "comfy-machine" in prometheus["depends_on"]
    config = load_yaml(COMPOSE.parent / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    health = node()["environment"]["MACHINE_HEALTH_PORT"]
    assert static["targets"] == [f"comfy-machine:{health}"]
    assert "comfy-machine" in services()


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package `prometheus`: apt-get install prometheus)",
)
def test_promtool_accepts_the_prometheus_config() -> None:
    out = subprocess.run(
        ["promtool", "check", "config", str(COMPOSE.parent / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
