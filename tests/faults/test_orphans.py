"""Every child dies with its reason (issue 12, points 2 and 3), with real processes: git, uv and
install.py run in their own process group under the group launcher, and a timeout, the agent's
SIGKILL or its SIGTERM leaves nothing they started running; the next boot repairs what was half
done. Leftovers are found by a marker each test puts in the argv (``sleep``'s argv[0]) and in
the environment of everything the node starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import git
import psutil
import pytest

from services.gpu.selftest import run_selftest
from services.install.git_launcher import use_group_git
from services.process_group import run_in_group
from tests.packages import build_wheel
from tests.support import Node, short_tmpdir, wait_until

MARKER_ENV = "CM_FAULT_MARKER"
AUTHOR = git.Actor("test", "test@example.invalid")
# Default INSTANCE_STOP_TIMEOUT (5 s) + 5 s: the bound on a SIGTERMed agent's exit.
STOP_BOUND_S = 10.0


# Markers this test run made: the cleanup below kills only their processes, never those of
# another run on the same machine.
MARKERS: list[str] = []


def new_marker() -> str:
    marker = f"cm-orphan-{uuid.uuid4().hex[:12]}"
    MARKERS.append(marker)
    return marker


def marked(marker: str, env: bool = True) -> list[str]:
    """Live processes (zombies aside) with ``marker`` in their argv, or in their environment's
    CM_FAULT_MARKER when ``env``: 'pid argv' for each."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            argv = proc.info["cmdline"] or []
            hit = any(marker in part for part in argv) or (
                env and proc.environ().get(MARKER_ENV) == marker
            )
        except psutil.Error:
            continue
        if hit:
            found.append(f"{proc.pid} {' '.join(argv)}")
    return found


def sleeping(marker: str) -> int:
    """How many of the marked ``sleep 3600`` run (argv[0] is the marker)."""
    count = 0
    for proc in psutil.process_iter(["cmdline", "status"]):
        argv = proc.info["cmdline"] or []
        count += bool(argv and argv[0] == marker and proc.info["status"] != psutil.STATUS_ZOMBIE)
    return count


def assert_nothing_left(marker: str, within: float, env: bool = True) -> None:
    deadline = time.monotonic() + within
    while left := marked(marker, env):
        if time.monotonic() > deadline:
            raise AssertionError(f"still running {within}s later: {left}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leftovers_between_tests() -> Iterator[None]:
    yield
    # A failed test must not leave marked processes for the next one to trip on.
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if any(marker in part for marker in MARKERS for part in argv):
            with contextlib.suppress(psutil.Error):
                proc.kill()


# Programs that leave TERM-ignoring children behind: one in their group, one in a session of its
# own (out of the group: only the launcher's subreaper catches it), then exit or hang.
LEAVER = """
import signal, subprocess, sys, time
marker, then = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: only SIGKILL ends them
for new_session in (False, True):
    subprocess.Popen([marker, "3600"], executable="sleep", start_new_session=new_session)
print("started", flush=True)
if then == "hang":
    signal.pause()  # SIGTERM is ignored: only SIGKILL ends it
sys.exit(int(then))
"""


def test_launcher_relays_the_exit_code_and_ends_what_the_program_left() -> None:
    marker = new_marker()
    out = run_in_group([sys.executable, "-c", LEAVER, marker, "3"], capture_output=True,
                       text=True, timeout=30, grace=0.5)
    assert out.returncode == 3 and out.stdout == "started\n"
    assert_nothing_left(marker, 0.5)
    killed = run_in_group(["sh", "-c", "kill -TERM $$"], timeout=30)
    assert killed.returncode == -signal.SIGTERM  # the program's signal, as subprocess says it
    missing = run_in_group(["no-such-program-here"], capture_output=True, timeout=30)
    assert missing.returncode == 127 and b"cannot run no-such-program-here" in missing.stderr


def test_a_timeout_ends_the_whole_group() -> None:
    marker = new_marker()
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_group([sys.executable, "-c", LEAVER, marker, "hang"], timeout=2, grace=0.5,
                     stdout=subprocess.PIPE)
    # SIGTERM is ignored by all of them: the launcher's SIGKILL after its grace ends them.
    assert time.monotonic() - started < 2 + 0.5 + 2
    assert_nothing_left(marker, 0.5)


def test_a_stuck_launcher_is_killed_with_both_groups() -> None:
    marker = new_marker()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_in_group([sys.executable, "-c", LEAVER, marker, "hang"], timeout=3, grace=0.5,
                         stdout=subprocess.DEVNULL)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: sleeping(marker) == 2, 30, "the program's children")
    (launcher,) = [p for p in psutil.Process().children() if "--group" in p.cmdline()]
    launcher.suspend()  # deaf to the SIGTERM the timeout sends: the agent side kills all
    thread.join(15)
    assert not thread.is_alive() and isinstance(outcome[0], subprocess.TimeoutExpired)
    assert_nothing_left(marker, 0.5)


def test_the_group_dies_with_a_sigkilled_parent() -> None:
    marker = new_marker()
    # A parent (the agent's stand-in here) that starts the launcher and is then SIGKILLed.
    parent_code = textwrap.dedent(f"""
        import signal, subprocess, sys
        from services.supervisor.launch import in_own_group
        subprocess.Popen(in_own_group([sys.executable, "-c", {LEAVER!r}, {marker!r}, "hang"]))
        signal.pause()
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        wait_until(lambda: sleeping(marker) == 2, 30, "the program's children")
        parent.kill()
        parent.wait(5)
        assert_nothing_left(marker, 3)
    finally:
        parent.kill()
        parent.wait(5)


async def test_a_hung_self_test_is_ended_with_its_children(tmp_path: Path) -> None:
    marker = new_marker()
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{LEAVER}' {marker} hang\n")
    fake_python.chmod(0o755)
    started = time.monotonic()
    result = await run_selftest(fake_python, {}, "cpu", 2)
    assert not result.ok and "GPU_SELFTEST_TIMEOUT" in result.report["error"]
    assert time.monotonic() - started < 2 + 2 + 2  # the launcher's default grace is 2 s
    assert_nothing_left(marker, 0.5)
    # Cancelled (the node stops): same.
    task = asyncio.create_task(run_selftest(fake_python, {}, "cpu", 60))
    await asyncio.to_thread(wait_until, lambda: sleeping(marker) == 2, 30, "the test's children")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_left(marker, 0.5)


class SilentServer:
    """A loopback TCP server that accepts every connection and never answers."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def group_git(tmp_path: Path) -> Iterator[Path]:
    """gitpython pointed at the wrapper, as the agent does; plain git again afterwards."""
    wrapper = use_group_git(tmp_path / "run")
    assert wrapper is not None
    yield wrapper
    git.refresh()


def test_gitpython_runs_git_in_its_own_group(
    group_git: Path, silent: SilentServer, tmp_path: Path, standin_repo: tuple[str, str]
) -> None:
    url, commit = standin_repo
    assert str(group_git) == git.Git.GIT_PYTHON_GIT_EXECUTABLE
    assert commit in git.cmd.Git().ls_remote(url)
    # A fetch from a server that never answers: SIGTERM to the pid gitpython holds (the
    # launcher) ends git and its transport helper.
    marker = new_marker()
    repo = git.Repo.init(tmp_path / "clone")
    repo.create_remote("origin", f"http://127.0.0.1:{silent.port}/{marker}.git")
    proc = repo.git.fetch("origin", as_process=True)
    wait_until(lambda: silent.connections, 30, "git to connect")
    helpers = marked(marker, env=False)
    assert any("remote-http" in p or "remote-curl" in p for p in helpers), helpers
    launcher = psutil.Process(proc.proc.pid)
    assert "--group" in launcher.cmdline()
    proc.proc.terminate()
    assert proc.proc.wait(5) == -signal.SIGTERM
    assert_nothing_left(marker, 0.5)
    repo.close()


# -- real nodes ---------------------------------------------------------------------------------


def custom_node_repo(root: Path, name: str, files: dict[str, str]) -> str:
    """A git repository of a custom node; ``url@commit`` for COMFYUI_CUSTOM_NODES."""
    path = root / name
    with git.Repo.init(path, initial_branch="main") as repo:
        for file, text in files.items():
            (path / file).write_text(text)
        repo.git.add("--all")
        repo.index.commit("init", author=AUTHOR, committer=AUTHOR)
        return f"{path.as_uri()}@{repo.head.commit.hexsha}"


# install.py that, while CM_INSTALL_PY_HANGS=1, puts the marker in its own argv, starts two
# TERM-ignoring `sleep 3600` (one in a session of its own) and hangs; otherwise it succeeds.
HANGING_INSTALL = """
import os, signal, subprocess, sys, time
marker = os.environ["CM_FAULT_MARKER"]
if os.environ.get("CM_INSTALL_PY_HANGS") != "1":
    sys.exit(0)
if marker not in sys.argv:
    os.execv(sys.executable, [sys.executable, __file__, marker])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for new_session in (False, True):
    subprocess.Popen([marker, "3600"], executable="sleep", start_new_session=new_session)
print("installing", flush=True)
signal.pause()  # SIGTERM is ignored: it hangs until its group is killed
"""
NODE_FILES = {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n", "install.py": HANGING_INSTALL}


@pytest.fixture
def hanging_node(make_node: Callable[..., Node]) -> Callable[..., Node]:
    """A 1-instance node with a custom node whose install.py hangs (CM_INSTALL_PY_HANGS=1)."""

    def make(**env: str) -> Node:
        root = short_tmpdir()
        node_spec = custom_node_repo(root, "hanger", NODE_FILES)
        return make_node(gpus=1, COMFYUI_CUSTOM_NODES=node_spec, CM_INSTALL_PY_HANGS="1",
                         **env)

    return make


def installing(marker: str) -> bool:
    """install.py's two sleeps run."""
    return sleeping(marker) == 2


def test_install_py_past_its_timeout_leaves_nothing_running(
    hanging_node: Callable[..., Node],
) -> None:
    marker = new_marker()
    node = hanging_node(INSTALL_PY_TIMEOUT="3", **{MARKER_ENV: marker}).start()
    wait_until(lambda: installing(marker), 60, "install.py and its children")

    def node_failed() -> dict | None:
        body = node.get("/health/comfyui/installation")[1]
        nodes = body["custom_nodes"]
        return body if nodes and nodes[0]["status"] == "failed" else None

    body = wait_until(node_failed, 30, "install.py to time out")
    assert "INSTALL_PY_TIMEOUT" in body["custom_nodes"][0]["error"]
    # The failure is reported once the whole group is gone, SIGTERM-ignoring children too.
    assert_nothing_left(marker, 0.5, env=False)
    # The node carries on without it (an optional node: degraded, serving).
    def serving() -> tuple[int, dict] | None:
        code, body = node.get("/health/comfyui")
        return (code, body) if body["ready_instances"] == 1 else None

    code, health = wait_until(serving, 60, "the instance serving")
    assert code == 200 and health["status"] == "degraded"


def test_sigkill_during_install_py_leaves_nothing_and_the_next_boot_repairs(
    hanging_node: Callable[..., Node],
) -> None:
    marker = new_marker()
    node = hanging_node(**{MARKER_ENV: marker}).start()
    wait_until(lambda: installing(marker), 60, "install.py and its children")
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(5)
    assert_nothing_left(marker, 3)
    node.env.pop("CM_INSTALL_PY_HANGS")
    node.start().wait_ready(90)
    _, install = node.get("/health/comfyui/installation")
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["install.py hanger"]["status"] == "done"
    assert install["custom_nodes"][0]["status"] == "ok", install["custom_nodes"][0]


def own_python(tmp_path: Path) -> Path:
    """A virtualenv of its own for ComfyUI (uv installs into it, not the test environment),
    that still imports the stand-in's aiohttp and pyyaml from the test environment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


def uv_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_sigkill_during_resolution_leaves_nothing_and_the_next_boot_repairs(
    make_node: Callable[..., Node], silent: SilentServer, tmp_path: Path
) -> None:
    marker = new_marker()
    python = own_python(tmp_path)
    root = short_tmpdir()
    spec = custom_node_repo(root, "needs_probe", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                                  "requirements.txt": "cm-stall-probe\n"})
    # uv resolves cm-stall-probe from an index that accepts the connection and never answers.
    stalled = uv_config(tmp_path / "stalled.toml",
                        f'index-url = "http://127.0.0.1:{silent.port}/simple"\n')
    node = make_node(
        gpus=1, files={"requirements.txt": ""}, COMFYUI_CUSTOM_NODES=spec,
        COMFYUI_PYTHON=str(python), UV_CONFIG_FILE=stalled, **{MARKER_ENV: marker},
    ).start()
    wait_until(lambda: silent.connections, 60, "uv to ask the index")
    assert any("--dry-run" in p for p in marked(marker)), marked(marker)
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(5)
    assert_nothing_left(marker, 3)
    # The index is back (a local one): the next boot resolves and installs, and serves.
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "cm-stall-probe", "1.0")
    node.env["UV_CONFIG_FILE"] = uv_config(
        tmp_path / "local.toml", f'no-index = true\nfind-links = ["{wheels}"]\n'
    )
    node.env["UV_OFFLINE"] = "1"
    node.start().wait_ready(90)
    _, install = node.get("/health/comfyui/installation")
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["install"]["status"] == "done", steps["install"]
    assert list(python.parent.parent.glob("lib/python*/site-packages/cm_stall_probe"))


def test_sigkill_during_a_clone_leaves_nothing_and_the_next_boot_repairs(
    make_node: Callable[..., Node], silent: SilentServer, standin_repo: tuple[str, str]
) -> None:
    marker = new_marker()
    url, _commit = standin_repo
    node = make_node(
        gpus=1, COMFYUI_REPO=f"http://127.0.0.1:{silent.port}/{marker}.git",
        **{MARKER_ENV: marker},
    ).start()
    wait_until(lambda: silent.connections, 60, "git to connect")
    assert any("remote-http" in p or "remote-curl" in p for p in marked(marker)), marked(marker)
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(5)
    assert_nothing_left(marker, 3)
    assert (node.workspace / ".ComfyUI.partial").exists()  # the half-done clone
    node.env["COMFYUI_REPO"] = url  # the server is back
    node.start().wait_ready(90)
    assert not (node.workspace / ".ComfyUI.partial").exists()
    _, install = node.get("/health/comfyui/installation")
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["checkout ComfyUI"]["detail"].startswith("cloned at ")


@pytest.mark.parametrize("phase", ["clone", "install.py", "resolution"])
def test_sigterm_in_any_install_phase_ends_the_agent_in_time_with_nothing_left(
    phase: str,
    make_node: Callable[..., Node],
    hanging_node: Callable[..., Node],
    silent: SilentServer,
    tmp_path: Path,
) -> None:
    marker = new_marker()
    env = {MARKER_ENV: marker}
    if phase == "clone":
        node = make_node(gpus=1, COMFYUI_REPO=f"http://127.0.0.1:{silent.port}/x.git", **env)
        busy: Callable[[], object] = lambda: silent.connections  # noqa: E731
    elif phase == "install.py":
        node = hanging_node(**env)
        busy = lambda: installing(marker)  # noqa: E731
    else:
        spec = custom_node_repo(short_tmpdir(), "needs_probe", {
            "__init__.py": "NODE_CLASS_MAPPINGS = {}\n", "requirements.txt": "cm-stall-probe\n"})
        stalled = uv_config(tmp_path / "stalled.toml",
                            f'index-url = "http://127.0.0.1:{silent.port}/simple"\n')
        node = make_node(gpus=1, files={"requirements.txt": ""}, COMFYUI_CUSTOM_NODES=spec,
                         COMFYUI_PYTHON=str(own_python(tmp_path)), UV_CONFIG_FILE=stalled,
                         **env)
        busy = lambda: silent.connections  # noqa: E731
    node.start()
    wait_until(busy, 60, f"the boot to hang in its {phase}")
    assert node.proc is not None
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(STOP_BOUND_S + 5)
    took = time.monotonic() - started
    assert took < STOP_BOUND_S, f"the agent took {took:.1f}s to stop: {node.log()}"
    assert code == 0, node.log()
    assert "stopped" in node.log()
    assert_nothing_left(marker, 1)
