"""Nothing waits forever on the network: a git server that accepts the connection and never
answers makes the install step fail within a bounded time (GIT_TIMEOUT without progress,
GIT_RETRIES retries), with a reason naming the URL, in health and in the exit; no git process
is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from config.errors import InstallError
from services.install.installer import Installer, InstallInputs
from services.state import StepStatus
from tests.gitserver import stalled_server
from tests.integration.test_installer import Steps
from tests.support import Node, wait_until

# Two attempts of ~2 s each, a 1 s backoff, process start-up: well under this.
BOUND_S = 30.0


@pytest.fixture
def stalled_url() -> Iterator[str]:
    with stalled_server() as port:
        yield f"http://127.0.0.1:{port}/owner/stalled.git"


def _git_processes(url: str) -> list[psutil.Process]:
    """Processes still working on ``url`` (git, git-remote-http, the launcher)."""
    port = url.split(":")[2].split("/")[0]
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or ())
    ]


def test_installer_gives_up_on_a_stalled_server(tmp_path: Path, stalled_url: str) -> None:
    ws = tmp_path / "ws"
    inputs = InstallInputs(
        comfyui_url=stalled_url, comfyui_ref="main", install_path=ws / "ComfyUI", nodes=(),
        python=Path(sys.executable), venv=None, base_python=sys.executable, protected=(),
        on_conflict="fail", install_py_timeout=30, workers=1, workspace=ws, min_free_bytes=0,
        git_timeout=2, git_retries=1,
    )
    steps = Steps()
    started = time.monotonic()
    with pytest.raises(InstallError) as info:
        Installer(inputs, steps).run()
    elapsed = time.monotonic() - started
    assert 3.5 < elapsed < BOUND_S  # it did wait out the stall, twice, but not for long
    message = str(info.value)
    assert stalled_url in message and "after 2 attempt(s)" in message, message
    assert "GIT_TIMEOUT=2s" in message and "GIT_RETRIES=1" in message
    status, _, error = steps.final["checkout ComfyUI"]
    assert status is StepStatus.FAILED and error == message
    assert _git_processes(stalled_url) == []


def test_up_reports_the_stall_in_health(
    make_node: Callable[..., Node], stalled_url: str
) -> None:
    # INSTALL_RETRIES=0: the node's own retries of a transient failure are tested apart
    # (tests/integration/test_install_retry.py); here the failure must show at once.
    node = make_node(gpus=1, COMFYUI_REPO=stalled_url, COMFYUI_REF="main", GIT_TIMEOUT="2",
                     GIT_RETRIES="1", INSTALL_RETRIES="0").start()
    started = time.monotonic()
    code, body = wait_until(
        lambda: (lambda r: r if r[1].get("status") == "failed" else None)(
            node.get("/health/comfyui?wait=5")
        ),
        BOUND_S,
        "the install to fail",
    )
    assert time.monotonic() - started < BOUND_S
    assert code == 503 and stalled_url in body["reasons"][0], body
    _, install = node.get("/health/comfyui/installation")
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["checkout ComfyUI"]["status"] == "failed"
    assert stalled_url in steps["checkout ComfyUI"]["error"]
    wait_until(lambda: _git_processes(stalled_url) == [], 10, "git processes to be gone")
    assert not [p for p in node.tree() if "git" in " ".join(p.cmdline())]


def test_install_command_exits_naming_the_url(workspace: Path, stalled_url: str) -> None:
    env = {
        **os.environ,
        "MACHINE_WORKSPACE": str(workspace / "ws"),
        "COMFYUI_REPO": stalled_url,
        "COMFYUI_REF": "main",
        "COMFYUI_CPU_ONLY": "true",
        "COMFYUI_PYTHON": sys.executable,
        "INSTALL_MIN_FREE_GB": "0",
        "GIT_TIMEOUT": "2",
        "GIT_RETRIES": "1",
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "machine", "install"],
        env=env, capture_output=True, text=True, timeout=BOUND_S * 2, check=False,
    )
    assert time.monotonic() - started < BOUND_S
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert stalled_url in output and "GIT_TIMEOUT" in output, output
    assert "internal error" not in output
    assert _git_processes(stalled_url) == []
