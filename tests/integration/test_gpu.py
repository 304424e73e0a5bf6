"""GPU health end to end: a real node on the fake NVML (a JSON file the test rewrites), faults
driven through to supervisord (instance stopped, not restarted) and to health (503, reason)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from services.gpu.fake import FakeGpu, FakeNvml
from tests.integration.test_cli import run_cli
from tests.support import Node, free_port_range, http_json, wait_until


def fake_gpus(count: int) -> list[FakeGpu]:
    return [FakeGpu(uuid=f"GPU-fake{i}-0000-0000-0000-00000000000{i}") for i in range(count)]


def gpu_node(make_node: Callable[..., Node], nvml_file: Path, gpus: int, **env: str) -> Node:
    defaults = {
        "COMFYUI_CPU_ONLY": "false",
        "MACHINE_FAKE_NVML": str(nvml_file),
        "GPU_SAMPLE_INTERVAL": "0.2",
        "GPU_SELFTEST": "false",
    }
    return make_node(gpus=gpus, **{**defaults, **env})


def test_faults_quarantine_their_gpu_and_the_others_keep_serving(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    nvml_file = tmp_path / "nvml.json"
    gpus = fake_gpus(5)
    FakeNvml.write(nvml_file, gpus)
    node = gpu_node(make_node, nvml_file, 5).start()
    body = node.wait_ready()
    assert [i["gpu_uuid"] for i in body["instances"]] == [g.uuid for g in gpus]
    code, inst = node.instance(0)
    assert code == 200 and inst["nvml"]["temperature_celsius"] == 40.0
    assert inst["nvml"]["driver_version"] and inst["nvml"]["quarantined"] is False
    pids = {i: node.instance(i)[1]["pid"] for i in range(5)}

    gpus[1].xids.append(79)  # fell off the bus
    gpus[2].ecc_uncorrected_total = 3
    gpus[3].lost = True
    gpus[4].temperature_celsius = 97.0
    gpus[0].xids.append(13)  # an application error: the GPU stays in service
    FakeNvml.write(nvml_file, gpus)
    expected = {
        1: "Xid 79 (GPU has fallen off the bus)",
        2: "3 uncorrected ECC error(s)",
        3: "stopped answering NVML",
        4: "temperature 97 °C",
    }
    for gpu, words in expected.items():
        code, inst = wait_until(
            lambda gpu=gpu: (r := node.instance(gpu))[1]["state"] == "STOPPED" and r,
            20,
            f"GPU {gpu}'s instance stopped",
        )
        assert code == 503 and inst["status"] == "failed", inst
        assert words in inst["reasons"][0] and "quarantined" in inst["reasons"][0], inst
        assert inst["nvml"]["quarantined"] is True and words in inst["nvml"]["quarantine_reason"]
        assert not _alive(pids[gpu]), f"GPU {gpu}'s ComfyUI (pid {pids[gpu]}) still runs"
    assert node.instance(1)[1]["nvml"]["xid_counts"] == {"79": 1}

    code, body = node.get("/health/comfyui")
    assert code == 200 and body["status"] == "degraded", body
    assert any("Xid 79" in r for r in body["reasons"])
    code, inst = node.instance(0)
    assert code == 200 and inst["pid"] == pids[0] and inst["nvml"]["xid_counts"] == {"13": 1}

    # Quarantine holds: after more samples and a reconcile pass, the instance is still down.
    seen = node.instance(1)[1]["nvml"]["sampled_at"]
    wait_until(
        lambda: node.instance(1)[1]["nvml"]["sampled_at"] > seen + 1, 20, "a second of samples"
    )
    assert node.instance(1)[1]["state"] == "STOPPED"
    metrics = _metrics(node)
    assert 'comfy_machine_gpu_quarantined{gpu="1"' in metrics
    assert _metric(metrics, "comfy_machine_gpu_quarantined", 'gpu="1"') == 1.0
    assert _metric(metrics, "comfy_machine_gpu_quarantined", 'gpu="0"') == 0.0


def test_a_gpu_selection_keeps_each_gpus_nvml_index_everywhere(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    # COMFYUI_GPUS=1,3 of four GPUs: `gpu` is the NVML index in every name, port, URL, label.
    nvml_file = tmp_path / "nvml.json"
    gpus = fake_gpus(4)
    FakeNvml.write(nvml_file, gpus)
    start = free_port_range(4)
    token = {"MACHINE_HEALTH_TOKEN": "gpu-index-test-token"}  # the log route needs one
    node = gpu_node(
        make_node, nvml_file, 2, COMFYUI_GPUS="1,3", COMFYUI_PORT_START=str(start), **token
    ).start()
    body = node.wait_ready()
    assert [i["gpu"] for i in body["instances"]] == [1, 3], body
    for gpu in (1, 3):
        code, inst = node.instance(gpu)
        assert code == 200, inst
        assert inst["gpu"] == gpu and inst["name"] == f"comfyui-gpu{gpu}"
        assert inst["port"] == start + gpu and inst["url"] == f"http://127.0.0.1:{start + gpu}"
        assert inst["gpu_uuid"] == gpus[gpu].uuid == inst["nvml"]["uuid"]
        assert inst["nvml"]["index"] == gpu
        assert inst["log_path"].endswith(f"comfyui-gpu{gpu}.log")
        # The URL reaches that very instance, bound to that GPU by UUID.
        code, stats = http_json(inst["url"] + "/system_stats")
        assert code == 200 and str(start + gpu) in stats["system"]["argv"]
        assert psutil.Process(inst["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == gpus[gpu].uuid
    for absent in (0, 2):
        code, missing = node.instance(absent)
        assert code == 404 and missing["known_gpus"] == [1, 3], missing

    metrics = _metrics(node)
    for gpu in (1, 3):
        labels = f'gpu="{gpu}"', f'name="comfyui-gpu{gpu}"', f'port="{start + gpu}"'
        assert _metric(metrics, "comfy_machine_instance_ready", *labels) == 1.0
        gpu_labels = f'gpu="{gpu}"', f'UUID="{gpus[gpu].uuid}"', f'device="nvidia{gpu}"'
        assert _metric(metrics, "comfy_machine_gpu_temperature_celsius", *gpu_labels) == 40.0
        assert _metric(metrics, "comfy_machine_gpu_quarantined", f'gpu="{gpu}"') == 0.0
    assert 'name="comfyui-gpu0"' not in metrics and 'name="comfyui-gpu2"' not in metrics

    # The CLI's --gpu is the same number.
    logs = run_cli("logs", "--gpu", "3", "--tail", "50", "--url", node.url, env=token)
    assert logs.returncode == 0 and f":{start + 3}" in logs.stdout, (logs.stdout, logs.stderr)
    wait = run_cli("wait-ready", "--gpu", "1", "--timeout", "5", "--url", node.url)
    assert wait.returncode == 0 and f"127.0.0.1:{start + 1}" in wait.stdout, wait

    # A fault on GPU 3 stops comfyui-gpu3 and says gpu 3; comfyui-gpu1 keeps serving.
    gpus[3].xids.append(79)
    FakeNvml.write(nvml_file, gpus)
    code, inst = wait_until(
        lambda: (r := node.instance(3))[1]["state"] == "STOPPED" and r, 20, "GPU 3's instance"
    )
    assert code == 503 and "Xid 79" in inst["reasons"][0], inst
    assert node.instance(1)[0] == 200
    metrics = _metrics(node)
    assert _metric(metrics, "comfy_machine_gpu_quarantined", 'gpu="3"') == 1.0
    assert _metric(metrics, "comfy_machine_gpu_quarantined", 'gpu="1"') == 0.0
    assert _metric(metrics, "comfy_machine_instance_ready", 'name="comfyui-gpu3"') == 0.0


def test_a_gpu_its_python_cannot_see_fails_the_self_test_and_is_quarantined(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    # The fake GPUs do not exist for torch (CPU torch, or none at all): the self-test must say
    # so and keep every instance from starting, and health must say why.
    nvml_file = tmp_path / "nvml.json"
    FakeNvml.write(nvml_file, fake_gpus(2))
    node = gpu_node(make_node, nvml_file, 2, GPU_SELFTEST="true").start()
    code, body = wait_until(
        lambda: (r := node.get("/health/comfyui"))[1]["status"] == "failed" and r,
        60,
        "the node failed",
    )
    assert code == 503
    for gpu in (0, 1):
        code, inst = node.instance(gpu)
        assert code == 503 and inst["state"] == "STOPPED" and inst["pid"] is None
        assert "sentinel self-test failed" in inst["reasons"][0], (inst, body, node.log())
        assert inst["nvml"]["selftest"]["ok"] is False


def test_no_driver_in_gpu_mode_fails_the_boot_with_the_fix(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    nvml_file = tmp_path / "nvml.json"
    FakeNvml.write(nvml_file, fake_gpus(1), no_driver=True)
    node = gpu_node(make_node, nvml_file, 1).start()
    assert node.proc is not None
    code = node.proc.wait(30)
    assert code == 2, node.log()
    assert "COMFYUI_CPU_ONLY=true" in node.log() and "nvmlInit failed" in node.log()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _metrics(node: Node) -> str:
    import urllib.request

    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _metric(text: str, name: str, *labels: str) -> float:
    """The value of the series of ``name`` whose labels include every one of ``labels``."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} with {labels}")
