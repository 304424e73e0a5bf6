"""The metrics collector reads MachineState at scrape time: names, labels and values follow it,
collect() does no I/O, and the deploy/ rules and dashboard select only labels it exposes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from health.metrics import DCGM_LABELS, XID_CODES_AT_ZERO, MachineCollector, build_registry
from health.server import create_app
from services.state import CustomNodeState, GpuStatus, MachineState, Phase, StepStatus
from services.supervisor.states import ProcessState
from tests.unit.test_checks import instance, make_ready, node

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "comfy-machine.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
INSTANCE_KEY = {"gpu", "name", "port"}


def scrape(state: MachineState) -> tuple[set[str], list[Sample]]:
    """Exposed metric names (families without samples included) and every sample."""
    text = generate_latest(build_registry(state, process=False)).decode()
    names: set[str] = set()
    samples: list[Sample] = []
    for family in text_string_to_metric_families(text):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
        names.update(s.name for s in family.samples)
        samples.extend(family.samples)
    return names, samples


def find(samples: list[Sample], metric: str, /, **labels: str) -> list[Sample]:
    """Samples of ``metric`` whose labels include ``labels`` (``name`` is a label too)."""
    return [
        s
        for s in samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(samples: list[Sample], metric: str, /, **labels: str) -> float:
    found = find(samples, metric, **labels)
    assert len(found) == 1, (metric, labels, found)
    return found[0].value


def rich_state() -> MachineState:
    """Every part filled: two GPUs with NVML samples, an install step, a custom node."""
    state = node(make_ready(instance(0)), make_ready(instance(1)))
    step = state.step("comfyui")
    step.status, step.duration_s = StepStatus.DONE, 1.5
    for name in ("inpaint", "tooling"):
        state.custom_nodes[name] = CustomNodeState(
            name, f"file:///{name}", "main", required=False, enabled=True
        )
    for i in (0, 1):
        state.gpus[i] = GpuStatus(
            index=i,
            uuid=f"GPU-{i}",
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"00000000:0{i}:00.0",
            sampled_at=1.0,
            temperature_celsius=60.0 + i,
            power_watts=300.0,
            utilization_ratio=0.5,
            memory_utilization_ratio=0.25,
            memory_used_bytes=2**30,
            memory_free_bytes=79 * 2**30,
            memory_total_bytes=80 * 2**30,
            ecc_corrected_total=3,
            ecc_uncorrected_total=0,
            remapped_rows_correctable=1,
            remapped_rows_uncorrectable=0,
            row_remap_pending=False,
            row_remap_failed=False,
            retired_pages_pending=False,
        )
    return state


def test_names_follow_prometheus_conventions() -> None:
    names, _ = scrape(rich_state())
    assert names and all(n.startswith("comfy_machine_") for n in names)
    text = generate_latest(build_registry(rich_state(), process=False)).decode()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    for unit in ("_seconds", "_bytes", "_celsius", "_watts", "_ratio"):
        assert any(n.endswith(unit) for n in names), unit
    assert "comfy_machine_build_info" in names
    # Our registry, never the global one; the agent's process metrics come along.
    assert not any(n.startswith("comfy_machine_") for n in _global_names())
    full = generate_latest(build_registry(rich_state())).decode()
    assert "process_resident_memory_bytes" in full and "python_info" in full


def _global_names() -> set[str]:
    return {f.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}


def test_node_metrics() -> None:
    state = rich_state()
    _, samples = scrape(state)
    phases = {s.labels["phase"]: s.value for s in find(samples, "comfy_machine_phase")}
    assert phases["READY"] == 1 and sum(phases.values()) == 1 and "RUNNING" not in phases
    assert value(samples, "comfy_machine_supervisor_up") == 1
    assert value(samples, "comfy_machine_boot_start_time_seconds") == state.boot_started_at
    build = find(samples, "comfy_machine_build_info")[0]
    assert build.value == 1 and build.labels["version"] and build.labels["python_version"]
    state.phase = Phase.INSTALLING
    state.supervisor_up = False
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_phase", phase="INSTALLING") == 1
    assert value(samples, "comfy_machine_supervisor_up") == 0
    # The workspace's free bytes once the agent has checked them.
    assert find(samples, "comfy_machine_workspace_free_bytes") == []
    state.workspace_free_bytes = 12345
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_workspace_free_bytes") == 12345


def test_instance_metrics_follow_the_state_at_each_scrape() -> None:
    up, down = make_ready(instance(0)), instance(1)
    up.restarts, up.queue_pending, up.queue_running = 2, 3, 1
    state = node(up, down)
    registry = build_registry(state, process=False)

    def samples() -> list[Sample]:
        text = generate_latest(registry).decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    first = samples()
    zero = {"gpu": "0", "name": "comfyui-gpu0", "port": "8188"}
    one = {"gpu": "1", "name": "comfyui-gpu1", "port": "8189"}
    assert value(first, "comfy_machine_instance_ready", **zero) == 1
    assert value(first, "comfy_machine_instance_ready", **one) == 0
    assert value(first, "comfy_machine_instance_restarts_total", **zero) == 2
    assert value(first, "comfy_machine_instance_queue_pending", **zero) == 3
    assert value(first, "comfy_machine_instance_queue_running", **zero) == 1
    assert value(first, "comfy_machine_instance_start_time_seconds", **zero) == up.started_at
    assert value(first, "comfy_machine_smoke_duration_seconds", **zero) == 0.01
    assert value(first, "comfy_machine_probe_duration_seconds", **zero) == 0.002
    assert value(first, "comfy_machine_instance_state", state="RUNNING", **zero) == 1
    assert value(first, "comfy_machine_instance_state", state="STOPPED", **one) == 1
    # Never started: no queue, start time, probe or smoke series for it (not fake zeros).
    for name in ("queue_pending", "start_time_seconds"):
        assert not find(first, f"comfy_machine_instance_{name}", **one)
    assert not find(first, "comfy_machine_smoke_duration_seconds", **one)
    info = find(first, "comfy_machine_instance_info", **zero)[0]
    assert info.labels["uuid"] == "GPU-0" and info.labels["url"] == "http://127.0.0.1:8188"
    for s in first:
        if s.name.startswith(
            ("comfy_machine_instance_", "comfy_machine_probe_", "comfy_machine_smo")
        ):
            assert set(s.labels) >= INSTANCE_KEY, s
    # The same registry, scraped again after the process dies: read at scrape time.
    up.pid_exited, up.restarts = True, 3
    second = samples()
    assert value(second, "comfy_machine_instance_ready", **zero) == 0
    assert value(second, "comfy_machine_instance_restarts_total", **zero) == 3
    # A smoke result of an earlier process does not count for the new one.
    up.pid, up.pid_exited = 101, False
    third = samples()
    assert value(third, "comfy_machine_smoke_passed", **zero) == 0
    assert not find(third, "comfy_machine_smoke_duration_seconds", **zero)


def test_gpu_metrics_carry_dcgm_labels_and_xid_counters_start_at_zero() -> None:
    state = rich_state()
    state.gpus[1].quarantined = True
    state.gpus[1].xid_counts = {79: 2, 999: 1}
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_gpu_quarantined", gpu="0", uuid="GPU-0") == 0
    assert value(samples, "comfy_machine_gpu_quarantined", gpu="1", uuid="GPU-1") == 1
    temp = find(samples, "comfy_machine_gpu_temperature_celsius", UUID="GPU-1")[0]
    assert set(temp.labels) == set(DCGM_LABELS) and temp.value == 61
    assert temp.labels["device"] == "nvidia1" and temp.labels["pci_bus_id"] == "00000000:01:00.0"
    assert temp.labels["modelName"] == "NVIDIA H100 80GB HBM3" and temp.labels["Hostname"]
    assert value(samples, "comfy_machine_gpu_framebuffer_used_bytes", UUID="GPU-0") == 2**30
    assert value(samples, "comfy_machine_gpu_ecc_corrected_errors_total", UUID="GPU-0") == 3
    assert value(samples, "comfy_machine_gpu_utilization_ratio", UUID="GPU-0") == 0.5
    xid0 = {
        s.labels["xid"]: s.value
        for s in find(samples, "comfy_machine_gpu_xid_errors_total", UUID="GPU-0")
    }
    assert xid0 == {str(c): 0 for c in XID_CODES_AT_ZERO}
    assert value(samples, "comfy_machine_gpu_xid_errors_total", UUID="GPU-1", xid="79") == 2
    assert value(samples, "comfy_machine_gpu_xid_errors_total", UUID="GPU-1", xid="999") == 1
    # A GPU NVML has not reported (or not sampled) yet: quarantine and Xid at 0, no gauges.
    state.gpus.clear()
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_gpu_quarantined", gpu="1", uuid="GPU-1") == 0
    assert value(samples, "comfy_machine_gpu_xid_errors_total", UUID="GPU-1", xid="79") == 0
    assert not find(samples, "comfy_machine_gpu_temperature_celsius")


def test_cpu_slots_have_quarantine_but_no_gpu_series() -> None:
    inst = make_ready(instance(0))
    inst.plan = _cpu_plan(inst)
    _, samples = scrape(node(inst))
    assert value(samples, "comfy_machine_gpu_quarantined", gpu="0", uuid="cpu-0") == 0
    assert not find(samples, "comfy_machine_gpu_xid_errors_total")


def _cpu_plan(inst: Any) -> Any:
    from dataclasses import replace

    return replace(inst.plan, gpu_uuid="cpu-0", gpu_name="cpu")


def test_install_model_and_placeholder_metrics() -> None:
    state = rich_state()
    names, samples = scrape(state)
    assert value(samples, "comfy_machine_install_step_duration_seconds", step="comfyui") == 1.5
    statuses = {
        s.labels["status"]: s.value
        for s in find(samples, "comfy_machine_install_step_status", step="comfyui")
    }
    assert statuses == {"pending": 0, "running": 0, "done": 1, "skipped": 0, "failed": 0}
    assert value(samples, "comfy_machine_custom_node_import_failed", node="inpaint") == 0
    state.custom_nodes["inpaint"].status = "failed"
    state.custom_nodes["tooling"].status = "skipped"  # over a requirements conflict
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_custom_node_import_failed", node="inpaint") == 1
    assert value(samples, "comfy_machine_custom_node_import_failed", node="tooling") == 1
    assert value(samples, "comfy_machine_phase", phase="DEGRADED") == 1  # optional nodes
    # Placeholders exist with stable names so dashboards and rules do not break.
    assert "comfy_machine_model_verified" in names and not find(samples, "comfy_machine_model_v")
    assert value(samples, "comfy_machine_models_required_missing") == 0
    assert value(samples, "comfy_machine_download_bytes_total") == 0


IO_EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "socket.connect",
    "socket.getaddrinfo",
    "socket.gethostname",
    "subprocess.Popen",
    "os.system",
}
_io_seen: list[str] | None = None


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if _io_seen is not None and event in IO_EVENTS:
        _io_seen.append(event)


sys.addaudithook(_audit)  # cannot be removed; it records only inside no_io()


@contextmanager
def no_io() -> Iterator[list[str]]:
    global _io_seen
    _io_seen = []
    try:
        yield _io_seen
    finally:
        _io_seen = None


def test_collect_does_no_io() -> None:
    collector = MachineCollector(rich_state())  # reads hostname and version here, once
    with no_io() as seen:
        families = list(collector.collect())
    assert families and seen == []


def _exprs(value: Any) -> Iterator[str]:
    """Every PromQL expression in a dashboard or rules document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("expr", "definition", "query") and isinstance(item, str):
                yield item
            else:
                yield from _exprs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _exprs(item)


SELECTOR = re.compile(r"(comfy_machine_\w+)\{([^}]*)\}")
LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
# Prometheus adds these to every series it scrapes.
TARGET_LABELS = {"job", "instance"}


def test_rules_and_dashboard_select_only_labels_the_metrics_have() -> None:
    _, samples = scrape(rich_state())
    labels: dict[str, set[str]] = {}
    for s in samples:
        labels.setdefault(s.name, set()).update(s.labels)
    documents = [json.loads(DASHBOARD.read_text()), yaml.safe_load(RULES.read_text())]
    checked = 0
    for expr in (e for doc in documents for e in _exprs(doc)):
        for name, selector in SELECTOR.findall(expr):
            used = set(LABEL.findall(selector)) - TARGET_LABELS
            assert used <= labels.get(name, set()), (expr, name, used)
            checked += 1
    assert checked >= 10


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= set(panel)
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package `prometheus`: apt-get install prometheus)",
)
def test_rules_pass_promtool() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


async def test_metrics_route_negotiates_the_format(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    state = rich_state()
    client = await aiohttp_client(create_app(state))
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "comfy_machine_instance_ready" in names and "process_cpu_seconds" in names
    state.instances[0].process_state = ProcessState.EXITED
    again = await (await client.get("/metrics")).text()
    assert 'comfy_machine_instance_ready{gpu="0",name="comfyui-gpu0",port="8188"} 0.0' in again
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_status_table_joins_gpu_samples_from_metrics(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    from health import checks
    from machine.cli import _gpu_facts, status_table

    state = rich_state()
    client = await aiohttp_client(create_app(state))
    # The CLI's client blocks (the standard library's http.client): off the server's loop.
    gpus = await asyncio.to_thread(_gpu_facts, str(client.make_url("")))
    assert gpus == {"GPU-0": (60.0, 2**30), "GPU-1": (61.0, 2**30)}
    state.instances[1].process_state = ProcessState.EXITED
    code, body = checks.node_report(state, 1_000_000.0)
    lines = status_table(code, body, gpus, width=120).splitlines()
    assert lines[0] == "node: degraded (phase DEGRADED, HTTP 200), 1/2 instances ready"
    assert lines[1].split() == [
        *("GPU", "NAME", "STATE", "READY", "PORT", "PID", "RESTARTS"),
        *("QUEUE", "TEMP", "MEM", "REASON"),
    ]
    assert lines[2].split() == [
        *("0", "comfyui-gpu0", "RUNNING", "yes", "8188", "100", "0", "0/0", "60C", "1.0GiB")
    ]
    assert lines[3].split()[:4] == ["1", "comfyui-gpu1", "EXITED", "no"]
    assert "exited" in lines[3] and len(lines[3]) <= 120
    assert _gpu_facts("http://127.0.0.1:9") == {}  # unreachable: the table shows "-"
