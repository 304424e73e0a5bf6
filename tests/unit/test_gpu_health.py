"""Health with quarantined GPUs: pure checks over a state the sampler and self-test wrote."""

from __future__ import annotations

import json

from health import checks
from services.state import GpuStatus
from tests.unit.test_checks import NOW, instance, make_ready, node

REASON = "GPU 1 (GPU-1) quarantined: Xid 79 (GPU has fallen off the bus): fell off the bus"


def test_a_quarantined_gpu_degrades_the_node_and_fails_its_instance() -> None:
    sick = make_ready(instance(1), pid=101)  # still running: the stop is under way
    sick.quarantined = REASON
    state = node(make_ready(instance(0)), sick)
    state.gpus = {
        0: GpuStatus(0, "GPU-0", "test", temperature_celsius=40.0, sampled_at=NOW),
        1: GpuStatus(
            1,
            "GPU-1",
            "test",
            quarantined=True,
            quarantine_reason="Xid 79 ...",
            xid_counts={79: 1},
            sampled_at=NOW,
        ),
    }
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "degraded" and body["ready_instances"] == 1
    assert any(r.startswith(REASON) for r in body["reasons"])
    code, entry = checks.instance_report(state, 1, NOW)  # type: ignore[misc]
    assert code == 503 and entry["status"] == "failed" and not entry["ready"]
    assert entry["reasons"][0].startswith(REASON + "; comfyui-gpu1 is stopped and stays stopped")
    assert entry["nvml"]["quarantined"] is True and entry["nvml"]["xid_counts"] == {"79": 1}
    json.dumps(entry)  # what the server sends
    code, entry = checks.instance_report(state, 0, NOW)  # type: ignore[misc]
    assert code == 200 and entry["nvml"]["temperature_celsius"] == 40.0


def test_every_gpu_quarantined_fails_the_node() -> None:
    insts = [instance(0), instance(1)]
    for inst in insts:
        inst.quarantined = f"GPU {inst.plan.gpu_uuid} quarantined: sentinel self-test failed"
    code, body = checks.node_report(node(*insts), NOW)
    assert code == 503 and body["status"] == "failed"


def test_cpu_mode_has_no_nvml_entry() -> None:
    code, entry = checks.instance_report(node(make_ready(instance(0))), 0, NOW)  # type: ignore[misc]
    assert code == 200 and entry["nvml"] is None
