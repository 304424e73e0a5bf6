"""deploy/k8s: validated offline against Kubernetes' schemas, and consistent with the image."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.ship.recipes import (
    DEPLOY,
    HEALTH_PORT,
    IMAGE,
    PORT_START,
    check_settings,
    k8s_manifests,
    k8s_resource,
    load_yaml,
    worker_script,
)

# The oldest schema kubernetes-validate ships that has everything used (internalTrafficPolicy
# is GA in 1.26), and the newest it ships.
VERSIONS = ["1.26.0", kubernetes_validate.latest_version()]
STARTUP_BUDGET_S = 30 * 60  # a cold install: clone, requirements, maybe torch


def agent_pod() -> dict[str, Any]:
    return k8s_resource("DaemonSet", "comfy-machine")["spec"]["template"]


def agent_container() -> dict[str, Any]:
    (container,) = agent_pod()["spec"]["containers"]
    return container


def gpus_per_node() -> int:
    return int(agent_container()["resources"]["limits"]["nvidia.com/gpu"])


def access_token_ref(container: dict[str, Any]) -> dict[str, Any]:
    """The Secret key COMFYUI_ACCESS_TOKEN comes from (never a value in the manifest)."""
    (entry,) = [e for e in container["env"] if e["name"] == "COMFYUI_ACCESS_TOKEN"]
    assert "value" not in entry
    return entry["valueFrom"]["secretKeyRef"]


def named_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in agent_container()["ports"]}
    return ports[name]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    for name, docs in k8s_manifests().items():
        assert docs, name
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(k8s_manifests())
    images = {
        c["image"]
        for docs in k8s_manifests().values()
        for doc in docs
        if doc["kind"] == "DaemonSet"
        for c in doc["spec"]["template"]["spec"]["containers"]
        + doc["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert images == {IMAGE}
    (entry,) = kustomization["images"]
    assert f"{entry['name']}:{entry['newTag']}" == IMAGE


def test_daemonset_takes_the_gpus_of_gpu_nodes_one_port_each() -> None:
    spec = agent_pod()["spec"]
    count = gpus_per_node()
    assert spec["nodeSelector"]["nvidia.com/gpu.count"] == str(count)
    assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    env = {e["name"]: e["value"] for e in agent_container()["env"] if "value" in e}
    # Reachable through the Service by way of the authenticating proxy, its token a Secret's.
    assert env["COMFYUI_EXPOSE"] == "proxy" and "COMFYUI_LISTEN" not in env
    assert access_token_ref(agent_container()) == {"name": "comfy-machine", "key": "access-token"}
    assert int(env["MACHINE_HEALTH_PORT"]) == named_port("health") == HEALTH_PORT
    start = int(env["COMFYUI_PORT_START"])
    assert start == PORT_START
    assert {p["name"] for p in agent_container()["ports"]} == {
        "health",
        *(f"gpu{i}" for i in range(count)),
    }
    for i in range(count):
        assert named_port(f"gpu{i}") == start + i
    check_settings({e["name"]: e.get("value") for e in agent_container()["env"]}, "daemonset")


def test_probes_startup_long_enough_for_a_cold_install_ready_and_live() -> None:
    container = agent_container()
    startup, ready, live = (
        container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/readyz"
    assert live["httpGet"]["path"] == "/livez"
    for probe in (startup, ready, live):
        assert named_port(probe["httpGet"]["port"]) == HEALTH_PORT


def test_workspace_is_the_nodes_disk_owned_by_the_agents_user() -> None:
    spec = agent_pod()["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in agent_container()["volumeMounts"] if m["mountPath"] == "/workspace"]
    assert volumes[mount["name"]]["hostPath"]["type"] == "DirectoryOrCreate"
    assert spec["securityContext"]["runAsUser"] == 1000  # the image's comfy user
    assert spec["securityContext"]["runAsNonRoot"] is True
    (init,) = spec["initContainers"]
    assert init["securityContext"]["runAsUser"] == 0
    assert "chown -R -h 1000:1000 /workspace" in " ".join(init["command"])
    assert [m["mountPath"] for m in init["volumeMounts"]] == ["/workspace"]


def test_service_exposes_the_instances_of_the_clients_own_node() -> None:
    service = k8s_resource("Service", "comfy-machine")
    daemonset = k8s_resource("DaemonSet", "comfy-machine")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {p["name"]: (p["containerPort"], p["name"]) for p in agent_container()["ports"]}


def test_example_workers_wait_for_their_gpu_then_connect() -> None:
    worker = k8s_resource("DaemonSet", "comfy-worker")
    service = k8s_resource("Service", "comfy-machine")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    spec = worker["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == agent_pod()["spec"]["nodeSelector"]
    gpus = []
    for container in spec["containers"]:
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # The worker sends the same token the agent's proxy asks for.
        assert access_token_ref(container) == access_token_ref(agent_container())
        script = worker_script(container)
        wait = next(line for line in script.splitlines() if "wait-ready" in line)
        assert wait.split()[:2] == ["comfy-machine", "wait-ready"]
        assert '--gpu "$GPU"' in wait and '--url "$COMFY_MACHINE_URL"' in wait
        assert script.index("wait-ready") < script.index("$url")  # waits, then connects
        assert env["COMFY_MACHINE_URL"] == f"http://{host}:{HEALTH_PORT}"
        assert env["COMFY_MACHINE_HOST"] == host
        assert int(env["COMFYUI_PORT_START"]) == PORT_START
        gpus.append(int(env["GPU"]))
    assert sorted(gpus) == list(range(gpus_per_node()))
