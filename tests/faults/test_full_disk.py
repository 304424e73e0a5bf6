"""A full workspace disk stops no instance (issue 12, point 4), with a real node on a small tmpfs
as its workspace: filled to the last byte, with an instance killed meanwhile, supervisord and the
agent stay up, the other instance keeps serving, health and /metrics say the disk is full; once
space returns the killed instance comes back ready, with no restart of anything else."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.disk import FULL_BELOW_BYTES
from tests.support import Node, http_json, short_tmpdir, wait_until

METRIC = "comfy_machine_workspace_free_bytes"


@pytest.fixture
def tmpfs_node(standin_repo: tuple[str, str]) -> Iterator[Node]:
    """A 2-instance node (not started) whose workspace is a 64 MiB tmpfs; the agent's own log
    is elsewhere, as a container's is."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs as the workspace needs root")
    root = short_tmpdir()
    workspace = root / "ws"
    workspace.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(workspace)],
        capture_output=True, text=True,
    )
    if mount.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip() or mount.returncode}")
    url, commit = standin_repo
    node = Node(workspace, {"COMFYUI_REPO": url, "COMFYUI_REF": commit}, gpus=2)
    node.log_path = root / "agent.log"
    try:
        yield node
    finally:
        node.kill_everything()
        subprocess.run(["umount", "-l", str(workspace)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def fill(path: Path) -> None:
    """Write ``path`` until not one more byte fits."""
    with path.open("wb", buffering=0) as fh:
        size = 1 << 20
        while size:
            try:
                fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2


def metric(node: Node) -> float | None:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(METRIC + " "):
                return float(line.split()[1])
    return None


def disk_reason(body: dict[str, Any]) -> str | None:
    return next((r for r in body["reasons"] if r.startswith("workspace disk full: ")), None)


def test_a_full_workspace_stops_no_instance_and_recovers_by_itself(tmpfs_node: Node) -> None:
    node = tmpfs_node.start()
    body = node.wait_ready(90)
    pids = {inst["gpu"]: inst["pid"] for inst in body["instances"]}
    (supervisord,) = [p for p in node.tree() if "supervisor.supervisord" in " ".join(p.cmdline())]
    assert (metric(node) or 0) > FULL_BELOW_BYTES

    filler = node.workspace / "filler"
    fill(filler)
    assert shutil.disk_usage(node.workspace).free < FULL_BELOW_BYTES
    code, body = wait_until(
        lambda: (lambda r: r if disk_reason(r[1]) else None)(node.get("/health/comfyui")),
        15, "health to say the disk is full",
    )
    # Degraded, not failed: both instances serve.
    assert code == 200 and body["status"] == "degraded", body
    assert "bytes free" in disk_reason(body) and str(node.workspace) in disk_reason(body)
    assert (metric(node) or 0) < FULL_BELOW_BYTES

    # An instance dies while nothing can be written: its exit, its restart and its output
    # must not take supervisord (or the agent) down.
    os.kill(pids[1], signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        inst = node.instance(1)[1]
        smoke = inst["smoke"]
        done = smoke and smoke["pid"] == inst["pid"] and smoke["status"] != "running"
        return inst if inst["pid"] not in (None, pids[1]) and done else None

    again = wait_until(restarted, 60, "the killed instance restarted and smoke-tested")
    assert not again["ready"], again  # its smoke image could not be written
    assert node.proc is not None and node.proc.poll() is None, node.log()
    assert supervisord.is_running() and supervisord.status() != psutil.STATUS_ZOMBIE
    code, other = node.instance(0)
    assert code == 200 and other["pid"] == pids[0] and other["ready"], other
    assert http_json(other["url"] + "/system_stats")[0] == 200
    code, body = node.get("/health/comfyui")
    assert code == 200 and body["status"] == "degraded" and disk_reason(body), body

    # Space returns: the node recovers by itself.
    filler.unlink()
    body = node.wait_ready(60)
    assert disk_reason(body) is None
    now = {inst["gpu"]: inst["pid"] for inst in body["instances"]}
    assert now[0] == pids[0] and now[1] == again["pid"]
    assert (metric(node) or 0) > FULL_BELOW_BYTES
    (still,) = [p for p in node.tree() if "supervisor.supervisord" in " ".join(p.cmdline())]
    assert still.pid == supervisord.pid


# supervisord's log handlers (supervisor/loggers.py) on a disk that is full: writes, flushes and
# the close of a rollover fail with ENOSPC, and so does stderr (/dev/full).
FULL_DISK_LOGGING = """
import errno, sys
from supervisor import loggers

if sys.argv[2] == "patched":
    from services.supervisor.supervisord import patch_loggers
    patch_loggers()

def enospc(*args):
    raise OSError(errno.ENOSPC, "No space left on device")

class FullDisk:
    closed = False
    write = flush = staticmethod(enospc)
    def tell(self):
        return 10**9  # past maxBytes: every record rolls over
    def close(self):
        self.closed = True
        enospc()

handler = loggers.RotatingFileHandler(sys.argv[1], maxBytes=10000, backupCount=1)
handler.stream.close()
handler.stream = FullDisk()
log = loggers.Logger(loggers.LevelsByName.INFO, [handler])
for i in range(3):
    log.info("exited: comfyui-gpu1 (terminated by SIGKILL) %d" % i)
log.info("space is back")  # the handler reopens its file
print("alive")
"""


@pytest.mark.parametrize("mode", ["patched", "as shipped"])
def test_supervisord_logging_on_a_full_disk(mode: str, tmp_path: Path) -> None:
    log_file = tmp_path / "supervisord.log"
    with open("/dev/full", "wb") as full:
        out = subprocess.run(
            [sys.executable, "-c", FULL_DISK_LOGGING, str(log_file), mode],
            stdout=subprocess.PIPE, stderr=full, text=True, timeout=60,
        )
    if mode == "patched":
        assert out.returncode == 0 and out.stdout == "alive\n"
        assert "space is back" in log_file.read_text()
    else:  # what killed supervisord: the traceback print to a full stderr escapes the logger
        assert out.returncode != 0 and out.stdout == ""
