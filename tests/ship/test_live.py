"""The recipes' commands against a real node booted by entrypoint.sh: the image's and compose's
health checks, the Kubernetes probes, and the example worker's script."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
from typing import Any

from tests.ship.conftest import Site
from tests.ship.recipes import (
    DEPLOY,
    HEALTH_PORT,
    healthcheck_command,
    k8s_resource,
    load_yaml,
    worker_script,
)
from tests.support import free_port_range, http_json, wait_until


def run_python_check(command: list[str], site: Site) -> int:
    """A health-check command (`python -c ...`) run with this interpreter, in the node's env."""
    assert command[:2] == ["python", "-c"], command
    return subprocess.run(
        [sys.executable, "-c", command[2]], env=site.env, capture_output=True, timeout=30
    ).returncode


def worker_container(gpu: int) -> dict[str, Any]:
    containers = k8s_resource("DaemonSet", "comfy-worker")["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if {"name": "GPU", "value": str(gpu)} in c["env"]]
    return container


def test_recipes_commands_against_a_running_node(site: Site) -> None:
    # As the recipes run it: behind the authenticating proxy, when Caddy is here to run it
    # (without, the worker's token is sent straight to the instance, which ignores it).
    token = "live-recipe-token-" + secrets.token_hex(8)
    proxy = {
        "COMFYUI_EXPOSE": "proxy",
        "COMFYUI_ACCESS_TOKEN": token,
        "COMFYUI_INTERNAL_PORT_START": str(free_port_range(2)),
    } if shutil.which("caddy") else {}
    node = site.start_demo(**proxy)
    # The worker starts with the node, as a pod would: it must wait, then connect.
    worker = worker_container(1)
    worker_env = {
        **{e["name"]: e["value"] for e in worker["env"] if "value" in e},
        "COMFY_MACHINE_URL": site.url,
        "COMFY_MACHINE_HOST": "127.0.0.1",
        "COMFYUI_PORT_START": str(site.port_start),
        "COMFYUI_ACCESS_TOKEN": token,  # the Secret's, in a pod
    }
    worker_run = site.start(argv=["bash", "-c", worker_script(worker)], **worker_env)
    site.wait_ready(node)

    # The image's HEALTHCHECK and compose's healthcheck.
    assert run_python_check(healthcheck_command(), site) == 0
    compose = load_yaml(DEPLOY / "compose" / "compose.yaml")
    compose_check = compose["services"]["comfy-machine"]["healthcheck"]["test"]
    assert compose_check[0] == "CMD" and run_python_check(compose_check[1:], site) == 0

    # The DaemonSet's probes, on the node's health port.
    (container,) = k8s_resource("DaemonSet", "comfy-machine")["spec"]["template"]["spec"][
        "containers"
    ]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]]
        assert port == HEALTH_PORT
        assert http_json(site.url + probe["path"])[0] == 200, kind

    # The worker went past wait-ready and reached ComfyUI on GPU 1.
    url = f"http://127.0.0.1:{site.port_start + 1}"
    wait_until(
        lambda: (
            f"gpu 1 is ready: connecting to {url}" in worker_run.stdout()
            and '"comfyui_version"' in worker_run.stdout()
        ),
        30,
        f"the worker connected; stderr: {worker_run.stderr()[-2000:]}",
    )

    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(20) == 0, node.stderr()[-3000:]
    assert run_python_check(healthcheck_command(), site) != 0  # no agent: unhealthy
