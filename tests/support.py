"""Test support: deadline polls (never fixed sleeps), free ports, a real node as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

# Recordings of a real ComfyUI 0.3.64 (what each file is and how it was recorded: README.md
# there). They are part of the repository: a missing one is an error, never a skip.
COMFYUI_RECORDINGS = Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64"


def recording_text(name: str) -> str:
    """One recorded file (a log) as text."""
    return (COMFYUI_RECORDINGS / name).read_text()


def recording(name: str) -> Any:
    """One recorded capture (JSON), parsed."""
    return json.loads(recording_text(name))


def squat(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port``, as another program holding an instance's port
    would be; the caller closes it."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    return squatter


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as exc:  # the thing polled may not exist yet
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(count: int) -> int:
    """First of ``count`` consecutive free ports, below the ephemeral range: a port the kernel
    may give any outgoing connection meanwhile would be taken when the node binds it."""
    high = min(60000, _ephemeral_start()) - count - 1
    for _ in range(200):
        base = random.randint(10000, high)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def http_json(url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """GET ``url``; status and JSON body (also for 4xx/5xx)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


# Every directory short_tmpdir() made; tests/conftest.py removes what is left at the end.
SHORT_TMPDIRS: list[Path] = []


def short_tmpdir() -> Path:
    """A new directory under /tmp, removed at the end of the session at the latest."""
    # Unix socket paths are limited to 107 bytes: keep workspaces short.
    path = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    SHORT_TMPDIRS.append(path)
    return path


class Node:
    """`comfy-machine up` as a real subprocess on free ports, in its own workspace."""

    def __init__(self, workspace: Path, env: dict[str, str], gpus: int) -> None:
        self.workspace = workspace
        self.health_port = free_port_range(1)
        self.port_start = free_port_range(gpus)
        self.gpus = gpus
        self.env = {
            **os.environ,
            "COMFYUI_CPU_ONLY": "true",
            "NUM_GPUS": str(gpus),
            "MACHINE_WORKSPACE": str(workspace),
            "MACHINE_HEALTH_PORT": str(self.health_port),
            "MACHINE_HEALTH_LISTEN": "127.0.0.1",
            "COMFYUI_PORT_START": str(self.port_start),
            "PROBE_INTERVAL": "0.2",
            "INSTANCE_STARTSECS": "1",
            # The stand-in needs only aiohttp and pyyaml, which the test environment has: run it
            # on this interpreter (as an image's Python would be) instead of a fresh virtualenv.
            "COMFYUI_PYTHON": sys.executable,
            "INSTALL_MIN_FREE_GB": "0",
            **env,
        }
        self.log_path = workspace / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def start(self, command: str = "up") -> Node:
        self.workspace.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "machine", command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
        return http_json(self.url + path, timeout)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        code, body = wait_until(
            lambda: self._answer("/health/comfyui?wait=5"), timeout, "node ready"
        )
        assert code == 200, (code, body, self.log())
        return body

    def _answer(self, path: str) -> tuple[int, dict[str, Any]] | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.log()}")
        code, body = self.get(path)
        return (code, body) if body.get("status") == "ready" else None

    def instance(self, gpu: int) -> tuple[int, dict[str, Any]]:
        return self.get(f"/health/comfyui/instances/{gpu}")

    def tree(self) -> list[psutil.Process]:
        """The agent and every process under it."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_everything(self) -> None:
        """Teardown: no test leaves a process behind, whatever happened."""
        if self.proc is not None:
            kill_process_tree(self.proc)


def kill_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc`` and wait; then SIGKILL it and everything that was under it."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    for leftover in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
