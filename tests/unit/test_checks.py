"""Health checks are pure: a state in, an HTTP status and a body with reasons out."""

from dataclasses import replace
from pathlib import Path

from health import checks
from services.plan import InstancePlan, ProxyPlan, ProxyRoute
from services.state import (
    InstanceState,
    MachineState,
    Phase,
    ProbeResult,
    ProxyState,
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


def test_fatal_in_backoff_keeps_fatal_and_says_when_it_starts_again() -> None:
    inst = instance(0)
    inst.process_state, inst.pid, inst.pid_exited = ProcessState.FATAL, 300, True
    inst.spawn_error = "Exited too quickly (process log may have details)"
    inst.log_tail = ["main.py: error: unrecognized arguments: --bogus"]
    inst.failures, inst.attempt, inst.backoff_s, inst.next_start_at = 2, 2, 60.0, NOW + 28.2
    code, body = checks.instance_report(node(inst), 0, NOW)
    assert code == 503 and body["status"] == "failed" and body["state"] == "FATAL"
    assert (body["attempt"], body["next_start_at"], body["backoff_s"]) == (2, NOW + 28.2, 60.0)
    reason = body["reasons"][0]
    assert reason.startswith("comfyui-gpu0 is FATAL: it kept failing to start (Exited too")
    assert "unrecognized arguments: --bogus" in reason
    assert reason.endswith("the agent starts it again in 28 s (attempt 2)")
    assert body["final"] is False and body["final_reason"] is None  # it may come back


def test_a_damped_crash_loop_says_so_in_words() -> None:
    inst = instance(0)
    inst.process_state, inst.pid, inst.pid_exited = ProcessState.STOPPED, 300, True
    inst.log_tail = ["RuntimeError: CUDA error: an illegal memory access was encountered"]
    inst.failures, inst.attempt, inst.backoff_s = 4, 3, 40.0
    inst.crash_times = [NOW - 180, NOW - 120, NOW - 50, NOW]
    inst.next_start_at = NOW + 40
    code, body = checks.instance_report(node(inst), 0, NOW)
    assert code == 503 and body["status"] == "failed" and body["state"] == "STOPPED"
    assert body["reasons"][0].startswith(
        "comfyui-gpu0 crash loop: 4 crashes in 3 min, next start in 40 s (attempt 3); "
        "last log lines: RuntimeError: CUDA error: an illegal memory access"
    )
    assert body["final"] is False


def test_final_reason_is_what_no_wait_can_fix() -> None:
    # Booting, starting, an instance in backoff, a taken port: each may still come by itself.
    waiting = instance(1)
    waiting.process_state, waiting.next_start_at, waiting.attempt = ProcessState.FATAL, NOW, 1
    blocked = instance(2)
    blocked.blocked_reason = "port 8190 is already in use (retrying)"
    for state in (
        node(instance(0), phase=Phase.INSTALLING),
        node(instance(0), waiting, blocked),
        MachineState(phase=Phase.STARTING, supervisor_expected=True),  # supervisord on its way
    ):
        assert checks.final_reason(state) is None
        assert all(checks.final_reason(state, g) is None for g in state.instances)
    # A FAILED node: for the node and every GPU.
    failed = node(instance(0), phase=Phase.FAILED, error="install failed: no main.py",
                  failed_step="installing")
    reason = checks.final_reason(failed, 0)
    assert reason == (
        "the node failed (step installing): install failed: no main.py; fix it and restart"
    )
    code, body = checks.node_report(failed, NOW)
    assert code == 503 and body["final"] is True and body["final_reason"] == reason
    # supervisord gone while running.
    gone = node(make_ready(instance(0)))
    gone.supervisor_up = False
    assert "supervisord is not running" in (checks.final_reason(gone) or "")
    # A quarantined GPU: final for it, and for the node (never ready, only degraded).
    sick = instance(1)
    sick.quarantined = "GPU GPU-1 quarantined: Xid 79 (GPU has fallen off the bus)"
    state = node(make_ready(instance(0)), sick)
    assert checks.final_reason(state, 0) is None
    assert checks.final_reason(state, 1) == f"gpu 1 is quarantined: {sick.quarantined}"
    code, body = checks.instance_report(state, 1, NOW)
    assert code == 503 and body["final"] is True and "Xid 79" in body["final_reason"]
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "degraded" and body["final"] is True
    assert "--gpu" in body["final_reason"]


def test_final_reason_of_custom_nodes_install_yes_import_no() -> None:
    from services.state import CustomNodeState, NodeStatus

    state = node(make_ready(instance(0)))
    state.custom_nodes = {
        "imports": CustomNodeState("imports", "u", "r", True, True, status=NodeStatus.FAILED,
                                   error="import failed: x", import_failed=True),
    }
    assert checks.final_reason(state) is None  # a restart checks the import again
    state.custom_nodes["clone"] = CustomNodeState(
        "clone", "u", "r", False, True, status=NodeStatus.FAILED, error="ref v9 not found"
    )
    assert checks.final_reason(state) == (
        "custom node clone failed to install: ref v9 not found; fix it and restart the node"
    )


def test_progress_moves_with_state_not_with_probes_or_countdowns() -> None:
    inst = instance(0)
    inst.process_state, inst.pid, inst.started_at = ProcessState.STARTING, 100, NOW
    state = node(inst)
    first = checks.progress_token(checks.node_report(state, NOW)[1])
    inst.last_probe = ProbeResult(NOW + 1, False, 0.01, "refused")
    assert checks.progress_token(checks.node_report(state, NOW + 3)[1]) == first
    make_ready(inst)
    moved = checks.progress_token(checks.node_report(state, NOW + 3)[1])
    assert moved != first
    instance_progress = checks.progress_token(checks.instance_report(state, 0, NOW)[1])
    inst.process_state, inst.next_start_at, inst.attempt = ProcessState.FATAL, NOW + 5, 1
    assert checks.progress_token(checks.instance_report(state, 0, NOW)[1]) != instance_progress


def test_a_full_workspace_degrades_a_serving_node_and_says_so() -> None:
    state = node(make_ready(instance(0)), make_ready(instance(1)),
                 workspace_path="/ws", workspace_free_bytes=4096, workspace_full=True)
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "degraded" and body["phase"] == "DEGRADED"
    assert body["reasons"][0].startswith("workspace disk full: 4096 bytes free on /ws")
    # Space returns: ready again, no restart needed.
    state.workspace_full, state.workspace_free_bytes = False, 10**9
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "ready" and body["reasons"] == []
    # While booting the reason is given too.
    state.phase, state.workspace_full = Phase.INSTALLING, True
    assert any("workspace disk full" in r for r in checks.node_report(state, NOW)[1]["reasons"])


def behind_proxy(*insts: InstanceState) -> tuple[MachineState, ProxyState]:
    """A node whose instances are served through the proxy, which serves (pid 300)."""
    proxy_plan = ProxyPlan(
        name="comfyui-proxy", binary="caddy", config_path=Path("/ws/run/caddy.json"),
        home=Path("/ws/run/caddy"), listen="0.0.0.0",
        routes=tuple(ProxyRoute(i.plan.gpu, 8188 + i.plan.gpu, f"127.0.0.1:{18188 + i.plan.gpu}")
                     for i in insts),
        log_path=Path("/ws/logs/comfyui-proxy.log"),
    )
    proxy = ProxyState(plan=proxy_plan, process_state=ProcessState.RUNNING, pid=300,
                       checked_pid=300)
    for inst in insts:
        inst.plan = replace(inst.plan, public_port=8188 + inst.plan.gpu,
                            public_url=f"http://127.0.0.1:{8188 + inst.plan.gpu}")
        inst.proxy = proxy
        assert inst.pid is not None
        inst.public_smoke = SmokeResult(inst.pid, SmokeStatus.PASSED, NOW - 1, 0.01)
    state = node(*insts)
    state.proxy = proxy
    return state, proxy


def test_behind_the_proxy_ready_needs_it_serving_and_the_smoke_through_it() -> None:
    state, proxy = behind_proxy(make_ready(instance(0)))
    code, body = checks.node_report(state, NOW)
    assert code == 200 and body["status"] == "ready", body["reasons"]
    entry = body["instances"][0]
    assert entry["public_url"] == "http://127.0.0.1:8188" and entry["public_port"] == 8188
    assert entry["public_smoke"]["status"] == "passed"
    assert body["proxy"]["serving"] is True and body["proxy"]["ports"] == [8188]
    # Killed: not ready at once, the reason names the proxy and the closed public port.
    proxy.pid_exited = True
    code, body = checks.node_report(state, NOW)
    assert code == 503 and body["instances"][0]["ready"] is False
    (reason,) = body["instances"][0]["reasons"]
    assert reason.startswith("comfyui-gpu0 is not reachable at http://127.0.0.1:8188: "
                             "comfyui-proxy (Caddy, pid 300) exited")
    assert body["proxy"]["serving"] is False and body["proxy"]["reasons"]
    # Restarted: a new process must answer its check first; the instance's smoke through the
    # proxy still counts (once per instance process).
    proxy.pid, proxy.pid_exited = 301, False
    _, body = checks.node_report(state, NOW)
    assert "waiting for its public ports to answer" in body["instances"][0]["reasons"][0]
    proxy.checked_pid = 301
    assert checks.node_report(state, NOW)[0] == 200


def test_behind_the_proxy_a_new_instance_process_runs_the_smoke_through_it_again() -> None:
    inst = make_ready(instance(0))
    state, _ = behind_proxy(inst)
    make_ready(inst, pid=101)  # restarted: passed its own smoke, not the one through the proxy
    _, body = checks.node_report(state, NOW)
    assert body["instances"][0]["reasons"] == [
        "comfyui-gpu0 is running its smoke prompt through the proxy (http://127.0.0.1:8188)"
    ]
    inst.public_smoke = SmokeResult(101, SmokeStatus.FAILED, NOW - 1, 0.01, error="HTTP 502")
    _, body = checks.node_report(state, NOW)
    entry = body["instances"][0]
    assert entry["status"] == "failed"
    assert entry["reasons"][0].startswith(
        "comfyui-gpu0 failed its smoke prompt through the proxy (http://127.0.0.1:8188): HTTP 502"
    )


def test_proxy_reasons_join_the_instance_own_and_fatal_fails_it() -> None:
    down = instance(1)
    down.process_state, down.pid, down.pid_exited = ProcessState.EXITED, 200, True
    state, proxy = behind_proxy(make_ready(instance(0)), down)
    proxy.process_state, proxy.pid_exited = ProcessState.FATAL, True
    proxy.spawn_error, proxy.next_start_at = "Exited too quickly", NOW + 30
    code, body = checks.node_report(state, NOW)
    assert code == 503 and body["status"] == "failed"
    first, second = body["instances"]
    assert first["status"] == "failed"
    assert "comfyui-proxy (Caddy) is FATAL: it kept failing to start (Exited too quickly)" in (
        first["reasons"][0])
    assert "the agent starts it again in 30 s" in first["reasons"][0]
    assert second["reasons"][0].startswith("comfyui-gpu1 (pid 200) exited")
    assert any("comfyui-proxy (Caddy) is FATAL" in r for r in second["reasons"][1:])


def test_a_taken_public_port_is_the_reason() -> None:
    state, proxy = behind_proxy(make_ready(instance(0)))
    proxy.process_state, proxy.pid, proxy.checked_pid = ProcessState.STOPPED, None, None
    proxy.blocked_reason = "comfyui-proxy (Caddy) not started: public port 8188 on 0.0.0.0 is taken"
    _, body = checks.node_report(state, NOW)
    assert body["instances"][0]["reasons"] == [
        "comfyui-gpu0 is not reachable at http://127.0.0.1:8188: comfyui-proxy (Caddy) not "
        "started: public port 8188 on 0.0.0.0 is taken"
    ]
    assert body["instances"][0]["status"] == "failed"
