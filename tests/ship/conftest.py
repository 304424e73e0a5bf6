"""Fixtures: entrypoint.sh run directly as a real process on free ports, in a temporary
workspace; whatever a test starts is gone after it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.ship.recipes import ENTRYPOINT, path_with_venv
from tests.support import free_port_range, http_json, kill_process_tree, short_tmpdir, wait_until


def gone(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still alive (a zombie waiting for its reaper counts as gone)."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


class Run:
    """One entrypoint.sh (or any command) started by a test, its output in files."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.out_path, self.err_path = cwd / f"{name}.stdout.log", cwd / f"{name}.stderr.log"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def kill_tree(self) -> None:
        kill_process_tree(self.proc)


class Site:
    """A temporary directory with a workspace, free ports and the environment to boot in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workspace = root / "ws"
        self.hooks = self.workspace / "hooks" / "pre-start.d"
        self.demo = self.workspace / "demo"
        self.health_port = free_port_range(3)
        self.port_start = self.health_port + 1
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("MACHINE_", "COMFYUI_", "NUM_GPUS"))
        }
        self.env.update(
            PATH=path_with_venv(),
            MACHINE_WORKSPACE=str(self.workspace),
            MACHINE_HEALTH_PORT=str(self.health_port),
            MACHINE_HEALTH_LISTEN="127.0.0.1",
            COMFYUI_PORT_START=str(self.port_start),
            # The stand-in needs only aiohttp and pyyaml: this interpreter, as an image's would be.
            COMFYUI_PYTHON=sys.executable,
            INSTALL_MIN_FREE_GB="0",
            PROBE_INTERVAL="0.2",
            INSTANCE_STARTSECS="1",
        )
        self.runs: list[Run] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def hook(self, name: str, text: str) -> Path:
        self.hooks.mkdir(parents=True, exist_ok=True)
        path = self.hooks / name
        path.write_text(text)
        return path

    def start(self, *args: str, argv: list[str] | None = None, **env: str) -> Run:
        argv = argv or [str(ENTRYPOINT), *args]
        run = Run(argv, {**self.env, **env}, self.root, f"run{len(self.runs)}")
        self.runs.append(run)
        return run

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ENTRYPOINT), *args],
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def start_demo(self, **env: str) -> Run:
        return self.start("demo", "--gpus", "2", "--workspace", str(self.demo), **env)

    def wait_ready(self, run: Run, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if run.proc.poll() is not None:
                raise AssertionError(f"exited {run.proc.returncode}: {run.stderr()[-3000:]}")
            return http_json(self.url + "/readyz", timeout=5)[0] == 200

        wait_until(ready, timeout, f"the node on {self.url} ready")


@pytest.fixture
def site() -> Iterator[Site]:
    root = short_tmpdir()
    made = Site(root)
    yield made
    for run in made.runs:
        run.kill_tree()
    shutil.rmtree(root, ignore_errors=True)
