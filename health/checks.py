"""Health checks: pure functions from MachineState to (HTTP status, JSON body). No I/O."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Any

from health import models as model_health
from services.backoff import crash_loop_words, duration_words
from services.state import (
    REPORTED_PHASES,
    GpuStatus,
    InstanceState,
    MachineState,
    ModelStatus,
    NodeStatus,
    Phase,
    ProxyState,
    SmokeResult,
    SmokeStatus,
    StepStatus,
)
from services.supervisor.states import ProcessState

Report = tuple[int, dict[str, Any]]

# A ready instance is taken out after this many probes in a row fail (one slow answer is noise).
PROBE_FAILURES_NOT_READY = 2
BOOT_PHASES = (Phase.INITIALIZING, Phase.INSTALLING, Phase.DOWNLOADING, Phase.STARTING)


def instance_ready(inst: InstanceState) -> bool:
    """Process up, HTTP answering, and the smoke prompt passed for this very process."""
    return (
        inst.process_alive
        and not inst.quarantined
        and inst.smoke is not None
        and inst.smoke.status is SmokeStatus.PASSED
        and inst.smoke.pid == inst.pid
        and inst.probe_failures < PROBE_FAILURES_NOT_READY
        and models_listed(inst)
        and public_path_ok(inst)
    )


def public_path_ok(inst: InstanceState) -> bool:
    """No proxy (COMFYUI_EXPOSE=none), or the proxy serves and this process's smoke prompt
    passed through it: users reach it the way they are meant to."""
    if inst.proxy is None:
        return True
    smoke = inst.public_smoke
    return (
        inst.proxy.serving
        and smoke is not None
        and smoke.pid == inst.pid
        and smoke.status is SmokeStatus.PASSED
    )


def proxy_reasons(proxy: ProxyState, now: float) -> list[str]:
    """Why the proxy does not serve the public ports (empty when it does)."""
    if proxy.serving:
        return []
    name, log_path = proxy.plan.name, proxy.plan.log_path
    ports = ", ".join(str(p) for p in proxy.plan.ports)
    closed = f"public port(s) {ports} on {proxy.plan.listen} are not served"
    tail = f"; last log lines: {' | '.join(proxy.log_tail)}" if proxy.log_tail else ""
    if proxy.blocked_reason:
        return [proxy.blocked_reason]
    state = proxy.process_state
    if state is ProcessState.FATAL:
        why = proxy.spawn_error or proxy.exit_description or "it exited during every start-up"
        again = (
            f"the agent starts it again in {duration_words(max(proxy.next_start_at - now, 0.0))}"
            if proxy.next_start_at is not None
            else "the agent starts it again after a backoff"
        )
        return [f"{name} (Caddy) is FATAL: it kept failing to start ({why}){tail}; {closed}; "
                f"fix the cause shown in {log_path}: {again}"]
    if state in (ProcessState.EXITED, ProcessState.BACKOFF) or proxy.pid_exited:
        detail = f" ({proxy.exit_description})" if proxy.exit_description else ""
        return [f"{name} (Caddy, pid {proxy.pid}) exited{detail}; {closed} until supervisord "
                f"restarts it{tail}"]
    if state is ProcessState.STOPPED:
        return [f"{name} (Caddy) is not started yet; {closed}"]
    if state is not ProcessState.RUNNING and state is not ProcessState.STARTING:
        return [f"{name} (Caddy) is {state.name}; {closed}"]
    if proxy.checked_pid != proxy.pid:
        error = f" ({proxy.check_error})" if proxy.check_error else ""
        return [f"{name} (Caddy, pid {proxy.pid}) is starting: waiting for its public ports "
                f"to answer{error}"]
    return [f"{name} (Caddy): the last {proxy.check_failures} checks of its public ports "
            f"failed ({proxy.check_error}); see {log_path}"]


def _public_path_reasons(inst: InstanceState, now: float) -> list[str]:
    """The proxy's reasons, or this instance's smoke prompt through it."""
    proxy = inst.proxy
    if proxy is None:
        return []
    if not proxy.serving:
        return [f"{inst.plan.name} is not reachable at {inst.plan.public_url}: {reason}"
                for reason in proxy_reasons(proxy, now)]
    smoke = inst.public_smoke if inst.public_smoke and inst.public_smoke.pid == inst.pid else None
    if smoke is None or smoke.status is SmokeStatus.RUNNING:
        return [f"{inst.plan.name} is running its smoke prompt through the proxy "
                f"({inst.plan.public_url})"]
    if smoke.status is SmokeStatus.FAILED:
        return [f"{inst.plan.name} failed its smoke prompt through the proxy "
                f"({inst.plan.public_url}): {smoke.error}; it runs again when the proxy "
                f"restarts, see {proxy.plan.log_path}"]
    return []


def models_listed(inst: InstanceState) -> bool:
    """No model check needed, or this process was checked and lists every required model."""
    return not inst.model_check_needed or (
        inst.model_check_pid == inst.pid and not inst.model_mismatches
    )


def _queue_depth(inst: InstanceState) -> int:
    return (inst.queue_pending or 0) + (inst.queue_running or 0)


def instance_accepting(
    inst: InstanceState, max_queue_depth: int | None, node_draining: bool = False
) -> bool:
    """Ready, not draining (the node after SIGTERM, or this instance by an operator), and its
    queue is below ``max_queue_depth`` (if set)."""
    if node_draining or inst.draining or not instance_ready(inst):
        return False
    return max_queue_depth is None or _queue_depth(inst) < max_queue_depth


def _not_ready_reasons(inst: InstanceState, now: float) -> list[str]:
    name, url = inst.plan.name, inst.plan.url
    state = inst.process_state
    tail = f"; last log lines: {' | '.join(inst.log_tail)}" if inst.log_tail else ""
    if inst.quarantined:
        return [
            f"{inst.quarantined}; {name} is stopped and stays stopped until the node restarts, "
            "the other GPUs keep serving"
        ]
    if inst.blocked_reason:
        return [inst.blocked_reason]
    if state is ProcessState.FATAL:
        why = inst.spawn_error or inst.exit_description or "it exited during every start-up"
        if inst.next_start_at is not None:
            wait = duration_words(max(inst.next_start_at - now, 0.0))
            again = f"the agent starts it again in {wait} (attempt {inst.attempt})"
        else:
            again = "the agent starts it again after a backoff"
        return [
            f"{name} is FATAL: it kept failing to start ({why}){tail}; fix the cause shown in "
            f"the log ({inst.plan.log_path}): {again}"
        ]
    if inst.next_start_at is not None:  # held by the backoff after crashes
        if inst.crash_times:
            what = crash_loop_words(inst.crash_times, now, inst.next_start_at)
        else:
            wait = duration_words(max(inst.next_start_at - now, 0.0))
            what = f"failed {inst.failures} times in a row, next start in {wait}"
        return [
            f"{name} {what} (attempt {inst.attempt}){tail}; the cause is in its log "
            f"({inst.plan.log_path})"
        ]
    if state is ProcessState.BACKOFF:
        return [f"{name} exited during start-up and supervisord is retrying it{tail}"]
    if state is ProcessState.EXITED or inst.pid_exited:
        detail = f" ({inst.exit_description})" if inst.exit_description else ""
        return [f"{name} (pid {inst.pid}) exited{detail}; supervisord restarts it{tail}"]
    if state is ProcessState.STOPPED:
        return [f"{name} is not started yet"]
    if state is ProcessState.STOPPING:
        return [f"{name} is stopping"]
    if state is ProcessState.UNKNOWN:
        return [f"{name} is in an unknown state; check supervisord's log"]
    # Process alive: what is it waiting for?
    up = f"up {now - inst.started_at:.0f}s" if inst.started_at else "starting"
    smoke = inst.smoke if inst.smoke and inst.smoke.pid == inst.pid else None
    if smoke is None or smoke.status is SmokeStatus.RUNNING:
        probe = inst.last_probe
        if smoke is None and probe is not None and not probe.ok:
            return [
                f"{name} (pid {inst.pid}, {up}) is starting: {url} not answering yet "
                f"({probe.error})"
            ]
        if smoke is None:
            return [f"{name} (pid {inst.pid}, {up}) is starting: waiting for {url}"]
        return [f"{name} is running its smoke prompt (EmptyImage -> SaveImage)"]
    if smoke.status is SmokeStatus.FAILED:
        return [
            f"{name} failed its smoke prompt (EmptyImage -> SaveImage): {smoke.error}; "
            f"the instance answers HTTP but cannot run a workflow, see {inst.plan.log_path}"
        ]
    if inst.probe_failures < PROBE_FAILURES_NOT_READY and not models_listed(inst):
        if inst.model_check_pid != inst.pid:
            return [f"{name} is being checked: does it list every required model?"]
        return list(inst.model_mismatches)
    if inst.probe_failures < PROBE_FAILURES_NOT_READY and not public_path_ok(inst):
        return _public_path_reasons(inst, now)
    probe = inst.last_probe
    error = probe.error if probe else "no answer"
    return [f"{name}: the last {inst.probe_failures} probes of {url} failed ({error})"]


def instance_status(inst: InstanceState) -> str:
    if instance_ready(inst):
        return "ready"
    failed = (
        inst.blocked_reason is not None
        or inst.quarantined is not None
        or inst.process_state is ProcessState.FATAL
        or inst.in_backoff
        or (
            inst.smoke is not None
            and inst.smoke.status is SmokeStatus.FAILED
            and inst.smoke.pid == inst.pid
        )
        or _public_path_failed(inst)
    )
    return "failed" if failed else "starting"


def _public_path_failed(inst: InstanceState) -> bool:
    """The proxy cannot start (a public port taken, FATAL) or this process's smoke prompt
    through it failed."""
    proxy, smoke = inst.proxy, inst.public_smoke
    if proxy is None:
        return False
    return (
        proxy.blocked_reason is not None
        or proxy.process_state is ProcessState.FATAL
        or (smoke is not None and smoke.pid == inst.pid and smoke.status is SmokeStatus.FAILED)
    )


def _smoke_body(smoke: SmokeResult | None) -> dict[str, Any] | None:
    if smoke is None:
        return None
    return {
        "pid": smoke.pid,
        "status": smoke.status.value,
        "duration_s": smoke.duration_s,
        "prompt_id": smoke.prompt_id,
        "error": smoke.error,
    }


def proxy_body(proxy: ProxyState | None, now: float) -> dict[str, Any] | None:
    """The proxy (COMFYUI_EXPOSE=proxy) as the node's body shows it; None without one."""
    if proxy is None:
        return None
    plan = proxy.plan
    return {
        "name": plan.name,
        "serving": proxy.serving,
        "state": proxy.process_state.name,
        "pid": proxy.pid,
        "restarts": proxy.restarts,
        "started_at": proxy.started_at,
        "listen": plan.listen,
        "ports": list(plan.ports),
        "tls": plan.tls_cert is not None,
        "attempt": proxy.attempt,
        "next_start_at": proxy.next_start_at,
        "log_path": str(plan.log_path),
        "log_tail": proxy.log_tail,
        "reasons": proxy_reasons(proxy, now),
    }


def drain_words(inst: InstanceState, node_draining: bool) -> str:
    """Why a draining instance takes no new work, with what it still has to finish."""
    who = "the node is stopping (SIGTERM)" if node_draining else "an operator drained it"
    left = f"{inst.queue_running or 0} running, {inst.queue_pending or 0} queued"
    return (f"{inst.plan.name} is draining: {who}; not accepting new work, the prompts it has "
            f"finish ({left}); pick another instance")


def instance_body(
    inst: InstanceState, max_queue_depth: int | None, now: float, node_draining: bool = False
) -> dict[str, Any]:
    """The per-instance entry workers and routers read."""
    ready = instance_ready(inst)
    accepting = instance_accepting(inst, max_queue_depth, node_draining)
    reasons = [] if ready else _not_ready_reasons(inst, now)
    if not ready and inst.proxy is not None and not inst.proxy.serving:
        # The instance's own trouble first; that its public port is closed, too.
        reasons += [r for r in _public_path_reasons(inst, now) if r not in reasons]
    status = instance_status(inst)
    draining = node_draining or inst.draining
    if draining:
        status = "draining"
        reasons.insert(0, drain_words(inst, node_draining))
    elif ready and not accepting:
        status = "degraded"
        reasons.append(
            f"{inst.plan.name} queue depth {_queue_depth(inst)} reached max_queue_depth="
            f"{max_queue_depth}: not accepting new work; pick another instance or wait"
        )
    probe = inst.last_probe
    smoke = inst.smoke
    return {
        "gpu": inst.plan.gpu,
        "name": inst.plan.name,
        "gpu_uuid": inst.plan.gpu_uuid,
        "gpu_name": inst.plan.gpu_name,
        "port": inst.plan.port,
        "url": inst.plan.url,
        # COMFYUI_EXPOSE=proxy: where users and remote workers come in (null without it).
        "public_port": inst.plan.public_port,
        "public_url": inst.plan.public_url,
        "status": status,
        "state": inst.process_state.name,
        "ready": ready,
        "accepting": accepting,
        "draining": draining,
        "pid": inst.pid,
        "restarts": inst.restarts,
        "started_at": inst.started_at,
        "uptime_s": round(now - inst.started_at, 3) if inst.started_at and ready else None,
        "last_probe": None
        if probe is None
        else {
            "at": probe.at,
            "ok": probe.ok,
            "duration_ms": round(probe.duration_s * 1000, 2),
            "error": probe.error,
        },
        "smoke": None
        if smoke is None
        else {
            "pid": smoke.pid,
            "status": smoke.status.value,
            "duration_s": smoke.duration_s,
            "prompt_id": smoke.prompt_id,
            "error": smoke.error,
        },
        "public_smoke": _smoke_body(inst.public_smoke),
        "queue_pending": inst.queue_pending,
        "queue_running": inst.queue_running,
        # The backoff (FATAL or a crash loop): held starts so far in this streak of failures,
        # when the next is due (null: none held) and the wait before it.
        "attempt": inst.attempt,
        "next_start_at": inst.next_start_at,
        "backoff_s": inst.backoff_s,
        "log_path": str(inst.plan.log_path),
        "log_tail": inst.log_tail,
        "reasons": reasons,
    }


def _boot_reasons(state: MachineState) -> list[str]:
    running = [s for s in state.install_steps if s.status is StepStatus.RUNNING]
    step = f": {', '.join(s.name for s in running)}" if running else ""
    if state.phase is Phase.DOWNLOADING:
        step = _download_progress(state)
    if state.phase is Phase.INSTALLING and state.install_next_attempt_at is not None:
        step += (f"; attempt {state.install_attempts} failed on the network "
                 f"({state.install_retry_error}), retrying (INSTALL_RETRIES)")
    return [f"the node is booting, phase {state.phase.value}{step}; wait with ?wait=SECONDS"]


def _download_progress(state: MachineState) -> str:
    """': 1.2 of 7.8 GiB, 2 model(s) left' for the models instances wait for."""
    waiting = [m for m in state.models.values()
               if m.when == "before_start"
               and m.status not in (ModelStatus.VERIFIED, ModelStatus.UNVERIFIED)]
    if not waiting:
        return ""
    done = sum(m.bytes_done for m in state.models.values() if m.when == "before_start")
    total = sum(m.bytes_total or m.size or 0 for m in state.models.values()
                if m.when == "before_start")
    of_total = f" of {total / 2**30:.1f}" if total else ""
    return (f": {done / 2**30:.1f}{of_total} GiB downloaded, {len(waiting)} model(s) left "
            "(details: /health/comfyui/models)")


FAILED_NODE_STATES = (NodeStatus.FAILED, NodeStatus.SKIPPED)


def custom_node_reasons(state: MachineState) -> tuple[list[str], list[str]]:
    """(reasons from required nodes, reasons from optional ones) that failed or were skipped."""
    required, optional = [], []
    for node in state.custom_nodes.values():
        if node.status not in FAILED_NODE_STATES:
            continue
        what = "was skipped" if node.status == NodeStatus.SKIPPED else "failed"
        reason = f"custom node {node.name} {what}: {node.error}"
        if node.required:
            required.append(reason + "; it is required, so the node cannot serve")
        else:
            optional.append(reason)
    return required, optional


def disk_reasons(state: MachineState) -> list[str]:
    """The workspace disk is full: instances keep serving (the node is degraded, not failed),
    but their logs, outputs and the install lock cannot be written until space is freed."""
    if not state.workspace_full:
        return []
    return [
        f"workspace disk full: {state.workspace_free_bytes} bytes free on "
        f"{state.workspace_path or 'the workspace'}; instance logs and outputs cannot be "
        "written: free space there (the node recovers by itself, no restart needed)"
    ]


def _body(status: str, phase: Phase | str, reasons: list[str], **extra: Any) -> dict[str, Any]:
    if phase not in REPORTED_PHASES:  # an internal phase is a bug in the caller, not an answer
        raise ValueError(f"phase {phase} is not reported; pass reported_phase(state, now)")
    return {"status": status, "phase": str(phase), "reasons": reasons, **extra}


def node_report(state: MachineState, now: float) -> Report:
    """/health/comfyui: ready and degraded are 200 (some instance can take work), else 503."""
    instances = [
        instance_body(i, state.max_queue_depth, now, state.draining)
        for _, i in sorted(state.instances.items())
    ]
    final = final_reason(state)
    summary = {
        "instances": instances,
        "ready_instances": sum(1 for i in instances if i["ready"]),
        "accepting": any(i["accepting"] for i in instances),
        "final": final is not None,
        "final_reason": final,
        # COMFYUI_EXPOSE=proxy: the proxy in front of the instances (null without it).
        "proxy": proxy_body(state.proxy, now),
    }
    if state.phase is Phase.FAILED:
        reason = state.error or "the boot failed"
        step = f" (step {state.failed_step})" if state.failed_step else ""
        return 503, _body("failed", Phase.FAILED, [reason + step], **summary)
    if state.draining and state.phase is not Phase.STOPPING:
        left = sum((i["queue_running"] or 0) + (i["queue_pending"] or 0) for i in instances)
        return 503, _body(
            "draining",
            Phase.STOPPING,
            [f"the node is draining (SIGTERM): it accepts no new work and waits for {left} "
             "running and queued prompt(s) to finish, then stops its instances"],
            draining=True,
            drain_deadline=state.drain_deadline,
            **summary,
        )
    if state.phase is Phase.STOPPING:
        return 503, _body(
            "failed",
            Phase.STOPPING,
            ["the node is shutting down; instances are stopping"],
            **summary,
        )
    disk = disk_reasons(state)
    if state.phase in BOOT_PHASES:
        return 503, _body("starting", state.phase, _boot_reasons(state) + disk, **summary)
    if state.supervisor_expected and not state.supervisor_up:
        return 503, _body(
            "failed",
            Phase.FAILED,
            ["supervisord is not running; no instance is supervised. See logs/supervisord.log"],
            **summary,
        )
    if not instances:
        return 200, _body(
            "ready", Phase.READY, ["ComfyUI is disabled (ENABLE_COMFYUI=false)"], **summary
        )
    required_failed, optional_failed = custom_node_reasons(state)
    reasons = (
        disk + required_failed + optional_failed + [r for i in instances for r in i["reasons"]]
    )
    ready = sum(1 for i in instances if i["ready"] and not i["draining"])
    if required_failed:
        return 503, _body("failed", Phase.FAILED, reasons, **summary)
    if ready == len(instances) and not optional_failed and not disk:
        return 200, _body("ready", Phase.READY, reasons, **summary)
    if ready:
        return 200, _body("degraded", Phase.DEGRADED, reasons, **summary)
    if all(i["status"] == "failed" for i in instances):
        return 503, _body("failed", Phase.FAILED, reasons, **summary)
    if any(i["draining"] and i["ready"] for i in instances):
        return 503, _body("draining", Phase.DEGRADED, reasons, **summary)
    return 503, _body("starting", Phase.STARTING, reasons, **summary)


def final_reason(state: MachineState, gpu: int | None = None) -> str | None:
    """Why the node (``gpu`` None) or the instance on ``gpu`` cannot become ready without
    someone acting; None while it still may by itself (booting, starting, an instance in
    backoff, a taken port that may be freed). The one definition of "hopeless": bodies carry
    it as ``final``/``final_reason``, ?wait= answers at once on it, wait-ready exits 3."""
    if state.phase is Phase.FAILED:
        step = f" (step {state.failed_step})" if state.failed_step else ""
        return f"the node failed{step}: {state.error or 'the boot failed'}; fix it and restart"
    if state.phase is Phase.RUNNING and state.supervisor_expected and not state.supervisor_up:
        return "supervisord is not running, so no instance is supervised; restart the node"
    if gpu is not None:
        inst = state.instances.get(gpu)
        if inst is not None and inst.quarantined:
            return f"gpu {gpu} is quarantined: {inst.quarantined}"
        return None
    # The node as a whole is ready only when every instance and every custom node is.
    for index, inst in sorted(state.instances.items()):
        if inst.quarantined:
            return (
                f"gpu {index} is quarantined ({inst.quarantined}): the node can be degraded, "
                "never ready, until it is back; wait for one GPU with --gpu N instead"
            )
    for node in state.custom_nodes.values():
        # An import failure is checked again at each start; an install failure is not.
        if node.status in FAILED_NODE_STATES and not node.import_failed:
            what = "was skipped" if node.status is NodeStatus.SKIPPED else "failed to install"
            return f"custom node {node.name} {what}: {node.error}; fix it and restart the node"
    return None


# The fields of a body (and of each of its instances) whose change is progress a waiter shows.
PROGRESS_FIELDS = (
    "status", "phase", "final", "ready", "accepting", "state", "pid", "restarts", "attempt",
    "next_start_at",
)


def progress_token(body: dict[str, Any]) -> str:
    """A short token that changes when the answer changes in a way a waiter reports (status,
    phase, an instance's state, pid, attempt, ...), not with every probe or countdown."""
    def pick(part: dict[str, Any]) -> list[Any]:
        smoke = part.get("smoke")
        return [part.get(k) for k in PROGRESS_FIELDS] + [
            smoke.get("status") if isinstance(smoke, dict) else None
        ]

    instances = body.get("instances")
    parts = [pick(body)] + [pick(i) for i in instances or () if isinstance(i, dict)]
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    return digest[:16]


def gpu_body(state: MachineState, uuid: str) -> dict[str, Any] | None:
    """What NVML last said about the GPU with ``uuid`` (None in CPU mode or before a sample)."""
    status: GpuStatus | None = next((g for g in state.gpus.values() if g.uuid == uuid), None)
    if status is None:
        return None
    body = asdict(status)
    body["xid_counts"] = {str(code): count for code, count in sorted(status.xid_counts.items())}
    return body


def reported_phase(state: MachineState, now: float) -> str:
    """The phase every body reports: once instances run, READY/DEGRADED/FAILED from them."""
    return node_report(state, now)[1]["phase"]


def instance_report(state: MachineState, gpu: int, now: float) -> Report | None:
    """/health/comfyui/instances/{gpu}: 200 when that instance accepts work; None if unknown."""
    inst = state.instances.get(gpu)
    if inst is None:
        return None
    body = instance_body(inst, state.max_queue_depth, now, state.draining)
    body["nvml"] = gpu_body(state, inst.plan.gpu_uuid)
    final = final_reason(state, gpu)
    body["final"], body["final_reason"] = final is not None, final
    phase = reported_phase(state, now)
    if state.phase in BOOT_PHASES and not body["ready"]:
        body["reasons"] = _boot_reasons(state) + body["reasons"]
    return (200 if body["accepting"] else 503), {**body, "phase": phase}


def installation_report(state: MachineState, now: float) -> Report:
    """/health/comfyui/installation: 200 once every install step is done or skipped (degraded
    when an optional custom node failed), 503 while installing or when ComfyUI cannot run."""
    steps = [
        {
            "name": s.name,
            "status": s.status.value,
            "started_at": s.started_at,
            "duration_s": s.duration_s,
            "detail": s.detail,
            "error": s.error,
        }
        for s in state.install_steps
    ]
    nodes = [
        {
            "name": n.name,
            "url": n.url,
            "ref": n.ref,
            "commit": n.commit,
            "required": n.required,
            "enabled": n.enabled,
            "status": n.status,
            "error": n.error,
            "import_checked": n.import_checked,
            "transient": n.transient,  # failed on the network (retried with INSTALL_RETRIES)
            "source": n.source,  # "git" or "registry" (Comfy Registry: id, version, sha256)
            "id": n.registry_id,
            "version": n.version,
            "sha256": n.sha256,
        }
        for n in state.custom_nodes.values()
    ]
    required_failed, optional_failed = custom_node_reasons(state)
    node_steps = {
        f"{step} {n}" for n in state.custom_nodes for step in ("checkout", "fetch", "install.py")
    }
    # A node's own failed step is reported through the node; other failed steps fail the boot.
    failed = [
        s for s in state.install_steps if s.status is StepStatus.FAILED and s.name not in node_steps
    ]
    reasons = [f"install step {s.name} failed: {s.error}" for s in failed]
    extra = {
        "steps": steps,
        "custom_nodes": nodes,
        # INSTALL_RETRIES: the install phase's attempt now (1: the first), and the transient
        # failure that made the last retry with when the next attempt starts (null: none due).
        "attempts": state.install_attempts,
        "retry_error": state.install_retry_error,
        "next_attempt_at": state.install_next_attempt_at,
    }
    phase = reported_phase(state, now)
    if failed or required_failed:
        return 503, _body("failed", phase, reasons + required_failed + optional_failed, **extra)
    pending = [
        s for s in state.install_steps if s.status in (StepStatus.PENDING, StepStatus.RUNNING)
    ]
    if state.phase in (Phase.INITIALIZING, Phase.INSTALLING) or pending:
        names = ", ".join(s.name for s in pending) or "not started"
        return 503, _body("starting", phase, [f"installing: {names}"], **extra)
    if optional_failed:
        return 200, _body("degraded", phase, optional_failed, **extra)
    return 200, _body("ready", phase, [], **extra)


def models_report(state: MachineState, now: float | None = None) -> Report:
    """/health/comfyui/models: each model verified/downloading/missing/failed with progress,
    per-instance listing mismatches and unlisted workflow files; 503 until all is in place."""
    now = time.time() if now is None else now
    return model_health.models_report(state, now, reported_phase(state, now))


def livez_report(state: MachineState, now: float) -> Report:
    """/livez: the agent answers and, once started, supervisord runs. Instances do not count."""
    if state.supervisor_expected and not state.supervisor_up:
        return 503, _body("failed", reported_phase(state, now), ["supervisord is not running"])
    return 200, _body("ready", reported_phase(state, now), [])


# What /readyz keeps of /health/comfyui: the answer, why, and counts (the instance entries stay
# on /health/comfyui), so the probe polled all day by every worker costs a few hundred bytes.
READYZ_FIELDS = (
    "status", "phase", "reasons", "ready_instances", "accepting", "final", "final_reason",
    "draining", "drain_deadline",
)


def readyz_report(state: MachineState, now: float) -> Report:
    """/readyz: /health/comfyui's status code, status, phase, reasons and counts, without the
    instance entries; its progress_token is /health/comfyui's, so ?since= works the same."""
    code, body = node_report(state, now)
    small = {k: body[k] for k in READYZ_FIELDS if k in body}
    small["instance_count"] = len(body["instances"])
    small["progress_token"] = progress_token(body)
    return code, small
