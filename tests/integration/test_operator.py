"""Operator actions (issue 13, point 6) over real HTTP against a real node: restart, drain,
undrain and the GPU retest need `Authorization: Bearer <MACHINE_HEALTH_TOKEN>` (401 without,
403 when no token is set), answer JSON, and are logged with the client's address, never the
token. The CLI's restart/drain/undrain/gpu-test --lift send the token from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.gpu.fake import FakeNvml
from tests.integration.test_gpu import fake_gpus, gpu_node
from tests.support import Node, wait_until

TOKEN = "operator-token-0123456789"


def post(node: Node, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(node.url + path, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def cli(node: Node, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MACHINE_HEALTH_TOKEN": token or ""}
    return subprocess.run(
        [sys.executable, "-m", "machine", *args, "--url", node.url],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_operator_actions_need_the_token_and_act(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    nvml_file = tmp_path / "nvml.json"
    gpus = fake_gpus(2)
    FakeNvml.write(nvml_file, gpus)
    node = gpu_node(make_node, nvml_file, 2, MACHINE_HEALTH_TOKEN=TOKEN,
                    GPU_UNHEALTHY_SAMPLES="1").start()
    node.wait_ready(90)

    # No token, a wrong one: 401 with JSON, and nothing happens.
    pid = node.instance(0)[1]["pid"]
    for token in (None, "wrong-token-0123456789"):
        code, body = post(node, "/health/comfyui/instances/0/restart", token)
        assert code == 401 and "Bearer" in body["error"], body
    assert node.instance(0)[1]["pid"] == pid
    assert post(node, "/health/comfyui/instances/7/drain", TOKEN)[0] == 404

    # restart: a new process, ready again.
    code, body = post(node, "/health/comfyui/instances/0/restart", TOKEN)
    assert code == 200 and body["ok"] is True and body["action"] == "restart", body
    wait_until(lambda: (i := node.instance(0)[1])["ready"] and i["pid"] != pid, 60,
               "gpu 0 ready again with a new process")

    # drain (CLI): gpu 1 takes no new work, the node serves on gpu 0; undrain brings it back.
    done = cli(node, "drain", "--gpu", "1")
    assert done.returncode == 0, done.stderr + done.stdout
    code, inst = node.instance(1)
    assert code == 503 and inst["status"] == "draining" and inst["accepting"] is False, inst
    code, body = node.get("/health/comfyui")
    assert code == 200 and body["status"] == "degraded", body
    done = cli(node, "undrain", "--gpu", "1", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True, done.stderr
    code, inst = node.instance(1)
    assert code == 200 and inst["status"] == "ready", inst

    # retest: the GPU was quarantined (hot); the self-test runs again. Without torch in this
    # environment it fails, so the quarantine stays and the answer says why.
    gpus[1].temperature_celsius = 97.0
    FakeNvml.write(nvml_file, gpus)
    wait_until(lambda: node.instance(1)[1]["state"] == "STOPPED", 20, "gpu 1 quarantined")
    gpus[1].temperature_celsius = 40.0
    FakeNvml.write(nvml_file, gpus)
    code, body = post(node, "/health/comfyui/gpus/1/retest", TOKEN)
    assert body["action"] == "retest" and body["lifted"] is False, body
    assert code == (200 if body["selftest_ok"] else 422), body
    if not body["selftest_ok"]:
        assert body["quarantined"] and node.instance(1)[1]["state"] == "STOPPED", body
    # restart of a quarantined GPU's instance is refused, saying how to lift it
    code, body = post(node, "/health/comfyui/instances/1/restart", TOKEN)
    assert code == 409 and "retest" in body["message"], body
    done = cli(node, "gpu-test", "--gpu", "1", "--lift")
    assert done.returncode == (0 if body.get("selftest_ok") else 1)

    log = node.log_path.read_text()
    assert '"operator action"' in log or "operator action" in log
    assert "127.0.0.1" in log
    assert TOKEN not in log


def test_operator_actions_are_off_without_a_token(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1).start()
    node.wait_ready(90)
    for path in ("/health/comfyui/instances/0/drain", "/health/comfyui/gpus/0/retest"):
        code, body = post(node, path, TOKEN)
        assert code == 403 and "MACHINE_HEALTH_TOKEN" in body["error"], body
    assert node.instance(0)[1]["accepting"] is True
    done = cli(node, "restart", "--gpu", "0")
    assert done.returncode == 1 and "MACHINE_HEALTH_TOKEN" in done.stdout


def _torch_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def test_retest_lifts_the_quarantine_when_the_self_test_passes(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    if not _torch_importable():
        pytest.skip("torch is not installed in this venv: .venv/bin/pip install torch (a CPU "
                    "build is enough; .ci/run installs the machine's CPU wheel)")
    # Fake GPUs that compute on the CPU: the self-test runs there, in the instance's Python
    # (this venv's, which has torch), as it would on a real GPU.
    nvml_file = tmp_path / "nvml.json"
    gpus = fake_gpus(1)
    FakeNvml.write(nvml_file, gpus, compute_on_cpu=True)
    node = gpu_node(make_node, nvml_file, 1, MACHINE_HEALTH_TOKEN=TOKEN,
                    GPU_UNHEALTHY_SAMPLES="1", COMFYUI_PYTHON=sys.executable).start()
    node.wait_ready(90)
    gpus[0].temperature_celsius = 97.0
    FakeNvml.write(nvml_file, gpus, compute_on_cpu=True)
    wait_until(lambda: node.instance(0)[1]["state"] == "STOPPED", 20, "gpu 0 quarantined")
    gpus[0].temperature_celsius = 40.0
    FakeNvml.write(nvml_file, gpus, compute_on_cpu=True)
    code, body = post(node, "/health/comfyui/gpus/0/retest", TOKEN)
    assert code == 200 and body["selftest_ok"] and body["lifted"] is True, body
    assert body["quarantined"] is None, body
    wait_until(lambda: node.instance(0)[1]["ready"], 60, "gpu 0 serving again after the retest")
