"""Fixtures for the ComfyUI stand-in tests: real processes started from a temp copy.

Each stand-in runs ``sys.executable main.py --port <free> --output-directory ...
--input-directory ... --cpu`` in a copy of ``machine.standin.SOURCE_DIR`` with its stdout
and stderr going to files, and is waited for by polling ``/system_stats`` until a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from machine.standin import SOURCE_DIR

READY_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_sigint() -> None:
    # A process started with SIGINT ignored keeps ignoring it (so does real ComfyUI);
    # give the child the default disposition, as supervisord's children have.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class StandIn:
    """One stand-in process and the directories it was given."""

    def __init__(
        self,
        base: Path,
        *extra_args: str,
        custom_nodes: dict[str, str] | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        default_args: bool = True,
    ) -> None:
        self.base = base
        self.root = (base / "comfyui").resolve()
        if not self.root.exists():
            shutil.copytree(SOURCE_DIR, self.root, ignore=shutil.ignore_patterns("__pycache__"))
        for rel, text in (custom_nodes or {}).items():
            path = self.root / "custom_nodes" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.output_dir = (base / "output").resolve()
        self.input_dir = (base / "input").resolve()
        self.output_dir.mkdir(exist_ok=True)
        self.input_dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "main.py", *extra_args]
        if default_args:
            args += [
                "--port", str(self.port),
                "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir),
                "--cpu",
            ]  # fmt: skip
        # Without PYTHONUNBUFFERED, as under a supervisor: the log must be flushed anyway.
        child_env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        child_env.update(env or {})
        n = len(list(base.glob("stderr*.log")))
        self.stdout_path = base / f"stdout{n}.log"
        self.stderr_path = base / f"stderr{n}.log"
        self._stdout: IO[bytes] = self.stdout_path.open("wb")
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            cwd=self.root,
            stdout=self._stdout,
            stderr=self._stderr,
            env=child_env,
            preexec_fn=_default_sigint,
        )

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.stdout_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Poll ``/system_stats`` until it answers 200; returns seconds since the start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"stand-in exited {self.proc.returncode}:\n{self.stderr}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)  # poll interval, not a fixed wait
        raise AssertionError(f"stand-in not ready after {timeout} s:\n{self.stderr}")

    def wait_exit(self, timeout: float = 5.0) -> int:
        """Wait for the process to end; returns its exit code."""
        code = self.proc.wait(timeout=timeout)
        self._close_files()
        return code

    def stop(self) -> None:
        """Kill the process if it still runs and release everything."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._close_files()

    def _close_files(self) -> None:
        self._stdout.close()
        self._stderr.close()


@pytest.fixture
def start_standin(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_standin(*args, name=..., custom_nodes=..., ...)`` -> a StandIn."""
    started: list[StandIn] = []

    def start(*extra_args: str, name: str = "s", **kwargs: Any) -> StandIn:
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        standin = StandIn(base, *extra_args, **kwargs)
        started.append(standin)
        return standin

    yield start
    for standin in started:
        standin.stop()


@pytest.fixture(scope="module")
def shared_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """One running stand-in (no extra custom nodes, empty model folders) for API checks."""
    standin = StandIn(tmp_path_factory.mktemp("shared"))
    try:
        standin.wait_ready()
        yield standin
    finally:
        standin.stop()
