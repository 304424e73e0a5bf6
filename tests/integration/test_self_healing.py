"""Self-healing end to end (issue 13): a real node, real supervisord, stand-in instances.

- FATAL is not forever: the agent starts a FATAL instance again after a doubling backoff, and
  once the cause is gone it is ready again without anyone touching the node.
- Crash loops are damped: crashes soon after a start hold the next start, growing.
- wait-ready tells the truth at once: exit 3 within a second for a FAILED node or a quarantined
  GPU; it keeps waiting (a line per change) for an instance in backoff, then exits 0."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from services.gpu.fake import FakeNvml
from tests.integration.test_cli import run_cli
from tests.integration.test_gpu import _metric, _metrics, fake_gpus, gpu_node
from tests.support import Node, free_port_range, wait_until

# A custom node that makes the stand-in exit during start-up while the flag file exists: the
# start fails every time (FATAL) until the file is gone.
FAIL_AT_START = """
import os, sys
flag = os.environ.get("STANDIN_FAIL_FLAG", "")
if flag and os.path.exists(flag):
    sys.stderr.write(f"failing at start: {flag} exists\\n")
    sys.stderr.flush()
    os._exit(3)
NODE_CLASS_MAPPINGS = {}
"""

# A custom node that makes the stand-in crash a few seconds after start-up (after supervisord
# counted it RUNNING) while the flag file exists: a crash loop.
CRASH_AFTER_START = """
import os, sys, threading
flag = os.environ.get("STANDIN_CRASH_FLAG", "")
if flag and os.path.exists(flag):
    def crash():
        sys.stderr.write("crashing after start\\n")
        sys.stderr.flush()
        os._exit(1)
    threading.Timer(float(os.environ["STANDIN_CRASH_AFTER"]), crash).start()
NODE_CLASS_MAPPINGS = {}
"""

BACKOFF = {
    "INSTANCE_FATAL_BACKOFF": "1",
    "INSTANCE_FATAL_BACKOFF_MAX": "2",
    "INSTANCE_STABLE_SECS": "60",
}


def _instance(node: Node, gpu: int, since: str | None = None) -> dict[str, Any]:
    """The instance's entry now, or with ``since`` (a ``progress_token``) at its next change."""
    if since is None:
        return node.instance(gpu)[1]
    return node.get(f"/health/comfyui/instances/{gpu}?wait=20&since={since}", timeout=30)[1]


def test_fatal_is_started_again_and_ready_once_the_cause_is_gone(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    flag = tmp_path / "fail"
    flag.write_text("x")
    node = make_node(
        gpus=1,
        files={"custom_nodes/flaky/__init__.py": FAIL_AT_START},
        STANDIN_FAIL_FLAG=str(flag),
        # Two failed starts make it FATAL; each start fails within startsecs (exact, see
        # test_node.test_crash_loop_ends_fatal_with_log_tail).
        INSTANCE_START_RETRIES="1",
        INSTANCE_STARTSECS="10",
        **{**BACKOFF, "INSTANCE_STABLE_SECS": "4"},
    ).start()

    def fatal_again() -> dict[str, Any] | None:
        body = _instance(node, 0)
        held = body["state"] == "FATAL" and body["next_start_at"] and body["log_tail"]
        return body if held and body["attempt"] >= 2 else None

    body = wait_until(fatal_again, 60, "FATAL, started again, FATAL again")
    assert body["status"] == "failed" and not body["ready"]
    assert body["backoff_s"] == 2.0  # 1 s, then doubled to the maximum of 2 s
    reason = body["reasons"][0]
    assert "is FATAL" in reason and "failing at start" in reason, reason
    assert "the agent starts it again in" in reason and f"(attempt {body['attempt']})" in reason
    assert body["final"] is False  # a waiter keeps waiting
    metrics = _metrics(node)
    assert _metric(metrics, "comfy_machine_instance_backoff_starts_total", 'gpu="0"') >= 1.0
    assert _metric(metrics, "comfy_machine_instance_backoff_attempt", 'gpu="0"') >= 2.0

    # A worker waits meanwhile; it sees each change, and it is 0 once the instance is ready.
    err_path = tmp_path / "wait-ready.err"
    with err_path.open("w") as err, subprocess.Popen(
        [sys.executable, "-m", "machine", "wait-ready", "--gpu", "0", "--timeout", "60",
         "--url", node.url],
        stdout=subprocess.PIPE, stderr=err, text=True,
    ) as waiter:  # on any failure: killed, and its pipe closed (no leak into a later test)
        try:
            wait_until(lambda: "waiting" in err_path.read_text(), 20, "a first progress line")
            flag.unlink()  # the cause is gone: nobody touches the node
            out, _ = waiter.communicate(timeout=90)
        finally:
            if waiter.poll() is None:
                waiter.kill()
    lines = err_path.read_text().splitlines()
    assert waiter.returncode == 0, lines
    assert out.strip() == f"gpu 0 ready: http://127.0.0.1:{node.port_start}"
    assert lines[0].startswith("waiting 0s: gpu 0 failed (state FATAL): comfyui-gpu0 is FATAL")
    assert len(lines) >= 2 and any("state STARTING" in line for line in lines), lines

    code, body = node.instance(0)
    assert code == 200 and body["ready"] and body["next_start_at"] is None
    assert body["restarts"] >= 1 and body["attempt"] >= 2
    assert _metric(_metrics(node), "comfy_machine_instance_backoff_starts_total", 'gpu="0"') >= 2
    # Once it has run INSTANCE_STABLE_SECS the streak is forgotten: a next failure starts at 1 s.
    wait_until(lambda: node.instance(0)[1]["attempt"] == 0, 20, "the streak forgotten")
    assert _metric(_metrics(node), "comfy_machine_instance_backoff_attempt", 'gpu="0"') == 0.0


def test_a_crash_loop_is_damped_with_a_growing_backoff(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    flag = tmp_path / "crash"
    flag.write_text("x")
    node = make_node(
        gpus=1,
        files={"custom_nodes/crashy/__init__.py": CRASH_AFTER_START},
        STANDIN_CRASH_FLAG=str(flag),
        # supervisord counts it RUNNING after 1 s (checked on its ~1 s loop); it crashes later.
        STANDIN_CRASH_AFTER="3",
        INSTANCE_STARTSECS="1",
        **{**BACKOFF, "INSTANCE_FATAL_BACKOFF_MAX": "4"},
    ).start()
    # Follow every change of the instance (?since=) until the third held start.
    seen = [wait_until(lambda: _instance(node, 0), 30, "the health server")]
    since = seen[0]["progress_token"]
    deadline = time.monotonic() + 90
    while not any(b["attempt"] >= 3 and b["next_start_at"] for b in seen):
        assert time.monotonic() < deadline, [(b["state"], b["attempt"]) for b in seen]
        body = _instance(node, 0, since)
        since = body["progress_token"]
        seen.append(body)
    held = [b for b in seen if b["next_start_at"]]
    # The first crash was restarted at once by supervisord; then 1 s, 2 s, 4 s.
    assert all(b["attempt"] >= 1 for b in held)
    by_attempt = {b["attempt"]: b for b in held}
    assert [by_attempt[a]["backoff_s"] for a in (1, 2, 3)] == [1.0, 2.0, 4.0]
    third = by_attempt[3]
    reason = third["reasons"][0]
    assert reason.startswith("comfyui-gpu0 crash loop: 4 crashes in "), reason
    assert "next start in" in reason and "(attempt 3)" in reason, reason
    assert third["status"] == "failed" and third["final"] is False
    # Damped: while held, supervisord's immediate restart was stopped (no process runs).
    assert any(b["state"] == "STOPPED" for b in held), [(b["state"], b["attempt"]) for b in held]
    # While held, health keeps the crash's last log lines (not the stopped restart's).
    def held_stopped() -> dict[str, Any] | None:
        body = _instance(node, 0)
        due = body["next_start_at"]
        held = due and due - time.time() > 1 and body["state"] == "STOPPED"
        return body if held and "crashing after start" in str(body["log_tail"]) else None

    stopped = wait_until(held_stopped, 30, "a held, stopped instance with the crash's log")
    assert "last log lines:" in stopped["reasons"][0] and "crashing after start" in (
        stopped["reasons"][0]
    )
    assert not _group_alive(node)  # no ComfyUI runs while held

    flag.unlink()  # fixed: the next start stays up
    code, body = node.get("/health/comfyui/instances/0?wait=30")
    assert code == 200 and body["ready"], body
    assert body["restarts"] >= 4
    metrics = _metrics(node)
    assert _metric(metrics, "comfy_machine_instance_backoff_starts_total", 'gpu="0"') >= 3.0


def _group_alive(node: Node) -> bool:
    """Any stand-in instance process under the node."""
    return any("main.py" in " ".join(p.cmdline()) for p in _tree(node))


def _tree(node: Node) -> list[psutil.Process]:
    try:
        return node.tree()
    except psutil.NoSuchProcess:
        return []


def _startup_cost() -> float:
    """What a wait-ready costs before it asks anything: Python, imports (~0.15 s on 2 cores)."""
    port = free_port_range(1)
    started = time.monotonic()
    run_cli("wait-ready", "--timeout", "0", "--url", f"http://127.0.0.1:{port}")
    return time.monotonic() - started


def _timed_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    out = run_cli(*args)
    return out, time.monotonic() - started


def test_wait_ready_exits_3_at_once_for_a_failed_node(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1, COMFYUI_REF="no-such-ref").start()
    wait_until(
        lambda: node.get("/health/comfyui")[1]["phase"] == "FAILED", 60, "the install to fail"
    )
    # ?wait= answers at once too.
    started = time.monotonic()
    code, body = node.get("/health/comfyui?wait=600", timeout=30)
    assert code == 503 and body["final"] is True and time.monotonic() - started < 0.5
    assert "no-such-ref" in body["final_reason"]

    budget = max(1.0, _startup_cost() + 0.5)
    for args in (("wait-ready",), ("wait-ready", "--gpu", "0")):
        out, elapsed = _timed_cli(*args, "--timeout", "600", "--url", node.url)
        assert out.returncode == 3, (out.stdout, out.stderr)
        assert elapsed < budget, elapsed
        what = "node" if len(args) == 1 else "gpu 0"
        assert out.stderr.startswith(f"{what} cannot become ready without someone acting:")
        assert "the node failed" in out.stderr and "no-such-ref" in out.stderr


def test_wait_ready_exits_3_at_once_for_a_quarantined_gpu(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    nvml_file = tmp_path / "nvml.json"
    gpus = fake_gpus(2)
    FakeNvml.write(nvml_file, gpus)
    node = gpu_node(make_node, nvml_file, 2).start()
    node.wait_ready()
    gpus[1].xids.append(79)  # fell off the bus: a fatal Xid quarantines at once
    FakeNvml.write(nvml_file, gpus)
    wait_until(lambda: node.instance(1)[1]["final"], 20, "GPU 1 quarantined")

    budget = max(1.0, _startup_cost() + 0.5)
    out, elapsed = _timed_cli("wait-ready", "--gpu", "1", "--timeout", "600", "--url", node.url)
    assert out.returncode == 3 and elapsed < budget, (out.stderr, elapsed)
    assert out.stderr.startswith("gpu 1 cannot become ready without someone acting:")
    assert "gpu 1 is quarantined" in out.stderr and "Xid 79" in out.stderr
    # The whole node can only be degraded now: no waiting for a ready that cannot come.
    out, elapsed = _timed_cli("wait-ready", "--timeout", "600", "--url", node.url)
    assert out.returncode == 3 and elapsed < budget and "--gpu N" in out.stderr, out.stderr
    # The other GPU serves.
    out = run_cli("wait-ready", "--gpu", "0", "--timeout", "10", "--url", node.url)
    assert out.returncode == 0 and f"127.0.0.1:{node.port_start}" in out.stdout
    # The backoff never starts a quarantined GPU's instance (watched for a second).
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        body = node.instance(1)[1]
        assert body["state"] == "STOPPED" and body["next_start_at"] is None, body
        time.sleep(0.1)
