"""Health checks are pure: a state in, an HTTP status and a body with reasons out."""

from pathlib import Path

from health import checks
from services.plan import InstancePlan
from services.state import (
    InstanceState,
    MachineState,
    Phase,
    ProbeResult,
    SmokeResult,
    SmokeStatus,
    StepStatus,
)
from services.supervisor.states import ProcessState

NOW = 1_000_000.0


def instance(gpu: int) -> InstanceState:
    plan = InstancePlan(
        gpu=gpu,
        name=f"comfyui-gpu{gpu}",
        gpu_uuid=f"GPU-{gpu}",
        gpu_name="test",
        port=8188 + gpu,
        listen="127.0.0.1",
        url=f"http://127.0.0.1:{8188 + gpu}",
        argv=("python", "main.py"),
        env={},
        cwd=Path("/ws/ComfyUI"),
        log_path=Path(f"/ws/logs/comfyui-gpu{gpu}.log"),
    )
    return InstanceState(plan=plan)


def make_ready(inst: InstanceState, pid: int = 100) -> InstanceState:
    inst.process_state, inst.pid, inst.started_at = ProcessState.RUNNING, pid, NOW - 5
    inst.last_probe = ProbeResult(NOW, True, 0.002)
    inst.smoke = SmokeResult(pid, SmokeStatus.PASSED, NOW - 1, 0.01)
    inst.queue_pending, inst.queue_running = 0, 0
    return inst


def node(*insts: InstanceState, phase: Phase = Phase.RUNNING, **kw: object) -> MachineState:
    state = MachineState(phase=phase, supervisor_expected=True, supervisor_up=True, **kw)
    state.instances = {i.plan.gpu: i for i in insts}
    return state


def test_all_ready() -> None:
    code, body = checks.node_report(node(make_ready(instance(0)), make_ready(instance(1))), NOW)
    assert code == 200 and body["status"] == "ready" and body["phase"] == "READY"
    assert body["reasons"] == [] and body["ready_instances"] == 2
    entry = body["instances"][0]
    for key in (
        "gpu",
        "name",
        "port",
        "url",
        "state",
        "ready",
        "pid",
        "restarts",
        "last_probe",
        "smoke",
        "queue_pending",
        "queue_running",
    ):
        assert key in entry
    assert entry["state"] == "RUNNING" and entry["ready"] is True


def test_one_down_is_degraded_but_serving() -> None:
    down = instance(1)
    down.process_state, down.pid, down.pid_exited = ProcessState.EXITED, 200, True
    code, body = checks.node_report(node(make_ready(instance(0)), down), NOW)
    assert code == 200 and body["status"] == "degraded"
    assert any("comfyui-gpu1 (pid 200) exited" in r for r in body["reasons"])
    code, inst = checks.instance_report(node(make_ready(instance(0)), down), 1, NOW)
    assert code == 503 and inst["ready"] is False


def test_pid_seen_dead_before_supervisord_reports_is_not_ready() -> None:
    inst = make_ready(instance(0))
    inst.pid_exited = True  # the pidfd fired; supervisord still says RUNNING
    code, body = checks.node_report(node(inst), NOW)
    assert code == 503 and body["instances"][0]["ready"] is False


def test_smoke_from_previous_process_does_not_count() -> None:
    inst = make_ready(instance(0), pid=100)
    inst.pid = 101  # restarted; smoke belongs to pid 100
    assert checks.instance_ready(inst) is False


def test_fatal_is_failed_with_log_tail() -> None:
    inst = instance(0)
    inst.process_state = ProcessState.FATAL
    inst.log_tail = ["main.py: error: unrecognized arguments: --bogus"]
    code, body = checks.node_report(node(inst), NOW)
    assert code == 503 and body["status"] == "failed" and body["phase"] == "FAILED"
    assert "FATAL" in body["reasons"][0] and "--bogus" in body["reasons"][0]


def test_port_taken_is_named() -> None:
    inst = instance(1)
    inst.blocked_reason = "comfyui-gpu1 not started: port 8189 on 127.0.0.1 is already in use"
    code, body = checks.node_report(node(make_ready(instance(0)), inst), NOW)
    assert code == 200 and body["status"] == "degraded"
    assert any("port 8189" in r for r in body["reasons"])


def test_starting_while_process_alive_without_answer() -> None:
    inst = instance(0)
    inst.process_state, inst.pid, inst.started_at = ProcessState.STARTING, 5, NOW - 3
    inst.last_probe = ProbeResult(NOW, False, 0.001, "ClientConnectorError")
    code, body = checks.node_report(node(inst), NOW)
    assert code == 503 and body["status"] == "starting"
    assert "not answering yet" in body["reasons"][0]


def test_failed_smoke_is_failed() -> None:
    inst = make_ready(instance(0))
    inst.smoke = SmokeResult(100, SmokeStatus.FAILED, NOW, 0.1, error="SaveImage: disk full")
    code, body = checks.node_report(node(inst), NOW)
    assert code == 503 and body["status"] == "failed" and "disk full" in body["reasons"][0]


def test_queue_depth_limit_stops_accepting() -> None:
    busy = make_ready(instance(0))
    busy.queue_pending, busy.queue_running = 1, 1
    state = node(busy, make_ready(instance(1)), max_queue_depth=2)
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["accepting"] is True
    assert body["instances"][0]["accepting"] is False and body["instances"][1]["accepting"] is True
    code, entry = checks.instance_report(state, 0, NOW)
    assert code == 503 and entry["ready"] is True and entry["accepting"] is False
    assert "max_queue_depth=2" in entry["reasons"][0]


def test_flaky_probe_after_ready() -> None:
    inst = make_ready(instance(0))
    inst.probe_failures = 1
    assert checks.instance_ready(inst) is True  # one slow answer is noise
    inst.probe_failures = checks.PROBE_FAILURES_NOT_READY
    inst.last_probe = ProbeResult(NOW, False, 5.0, "TimeoutError")
    code, body = checks.node_report(node(inst), NOW)
    assert code == 503 and "TimeoutError" in body["reasons"][0]


def test_boot_phases_are_starting() -> None:
    state = node(instance(0), phase=Phase.INSTALLING)
    state.step("comfyui").status = StepStatus.RUNNING
    code, body = checks.node_report(state, NOW)
    assert code == 503 and body["status"] == "starting" and body["phase"] == "INSTALLING"
    assert "comfyui" in body["reasons"][0]
    code, inst = checks.installation_report(state, NOW)
    assert code == 503 and inst["steps"][0]["status"] == "running"


def test_failed_install_names_step() -> None:
    state = node(instance(0), phase=Phase.FAILED)
    step = state.step("comfyui")
    step.status, step.error = StepStatus.FAILED, "ref 'v9' not found"
    state.error, state.failed_step = "ref 'v9' not found", "installing"
    code, body = checks.node_report(state, NOW)
    assert code == 503 and body["status"] == "failed" and "v9" in body["reasons"][0]
    code, inst = checks.installation_report(state, NOW)
    assert code == 503 and "install step comfyui failed" in inst["reasons"][0]


def test_liveness_is_not_readiness() -> None:
    inst = instance(0)
    inst.process_state = ProcessState.FATAL
    state = node(inst)
    assert checks.livez_report(state, NOW)[0] == 200
    assert checks.node_report(state, NOW)[0] == 503
    state.supervisor_up = False
    assert checks.livez_report(state, NOW)[0] == 503


def test_models_without_manifest() -> None:
    code, body = checks.models_report(node(make_ready(instance(0))))
    assert code == 200 and body["configured"] is False and "no model manifest" in body["message"]


def test_every_body_has_status_phase_reasons() -> None:
    state = node(instance(0), phase=Phase.STARTING)
    for code, body in (
        checks.node_report(state, NOW),
        checks.installation_report(state, NOW),
        checks.models_report(state),
        checks.livez_report(state, NOW),
        checks.instance_report(state, 0, NOW),
    ):
        assert code in (200, 503)
        assert {"status", "phase", "reasons"} <= body.keys()
        assert body["status"] in ("ready", "starting", "degraded", "failed")


def test_failed_custom_nodes_degrade_or_fail_the_node() -> None:
    from services.state import CustomNodeState

    state = node(make_ready(instance(0)))
    state.custom_nodes["extra"] = CustomNodeState(
        "extra", "file:///x", "v1", required=False, enabled=True, status="failed",
        error="No module named 'nonexistent_dep'")
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "degraded"
    assert "custom node extra failed: No module named 'nonexistent_dep'" in body["reasons"][0]
    code, install = checks.installation_report(state, NOW)
    assert code == 200 and install["status"] == "degraded"
    assert install["custom_nodes"][0]["status"] == "failed"
    state.custom_nodes["extra"].required = True
    code, body = checks.node_report(state, NOW)
    assert code == 503 and body["status"] == "failed" and "required" in body["reasons"][0]
    assert checks.installation_report(state, NOW)[0] == 503


def test_installation_reports_the_public_phase() -> None:
    code, body = checks.installation_report(node(make_ready(instance(0))), NOW)
    assert code == 200 and body["phase"] == "READY"  # never the internal RUNNING
    assert checks.livez_report(node(make_ready(instance(0))), NOW)[1]["phase"] == "READY"


def test_downloading_phase_says_how_far() -> None:
    from services.state import ModelState

    state = node(instance(0), phase=Phase.DOWNLOADING)
    state.models["vae/a.safetensors"] = ModelState(
        "vae/a.safetensors", "vae", "a.safetensors", "https://x/a", "/m/vae/a.safetensors",
        required=True, when="before_start", size=2 * 2**30, sha256=None, status="downloading",
        bytes_done=2**30, bytes_total=2 * 2**30)
    code, body = checks.node_report(state, NOW)
    assert code == 503 and "1.0 of 2.0 GiB downloaded, 1 model(s) left" in body["reasons"][0]
