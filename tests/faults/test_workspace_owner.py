"""One workspace, one owner (issue 12, point 1), with real processes: a second writer on a
live node's workspace is refused at once and the node keeps serving; a SIGKILLed owner's
leftovers are reaped by the next `up`, never a live owner's."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from config.errors import WorkspaceBusy
from config.settings import load_settings
from services.files import file_identity, unlink_if_same
from services.plan import make_plan
from services.supervisor.daemon import reap_stale
from services.supervisor.events import EventReceiver
from services.workspace_lock import acquire, live_owner, lock_path
from tests.support import Node, free_port_range, wait_until

# A second writer must be refused "at once": the time an interpreter takes to start and read
# its settings, never a boot's worth (install, supervisord start).
AT_ONCE_S = 15.0


def run_machine(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "machine", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def fds_to(pid: int, path: Path) -> list[str]:
    """The descriptors of process ``pid`` open on ``path``."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                found.append(fd.name)
        except OSError:
            continue
    return found


def supervisord_of(node: Node) -> psutil.Process:
    (proc,) = [p for p in node.tree() if "supervisor.supervisord" in " ".join(p.cmdline())]
    return proc


def lock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_second_writer_refused_at_once_and_first_node_keeps_serving(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1).start()
    node.wait_ready()
    assert node.proc is not None
    agent = node.proc.pid
    _, before = node.instance(0)
    run = node.workspace / "run"
    sockets = {name: file_identity(run / name) for name in ("events.sock", "supervisor.sock")}
    owner = json.loads(lock_path(node.workspace).read_text())
    assert owner["pid"] == agent and owner["command"] == "comfy-machine up"
    assert "machine up" in owner["cmdline"]
    # Only the agent holds the lock: supervisord, the event relay and the instances do not.
    assert fds_to(agent, lock_path(node.workspace))
    for proc in node.tree()[1:]:
        assert fds_to(proc.pid, lock_path(node.workspace)) == [], proc.cmdline()

    other = {**node.env, "MACHINE_HEALTH_PORT": str(free_port_range(1))}
    for command in (["up"], ["install"], ["models"], ["demo", "--workspace", str(node.workspace)]):
        started = time.monotonic()
        out = run_machine(*command, env=other)
        took = time.monotonic() - started
        assert out.returncode == 2, (command, out.stderr)
        assert f"is in use by pid {agent} (" in out.stderr and "machine up" in out.stderr
        assert f"kill -TERM {agent}" in out.stderr and "another MACHINE_WORKSPACE" in out.stderr
        assert took < AT_ONCE_S, (command, took)

    # The first node never noticed: same agent, same instance, its sockets untouched.
    assert node.proc.poll() is None
    assert node.get("/health/comfyui")[0] == 200
    code, after = node.instance(0)
    assert code == 200 and after["pid"] == before["pid"] and after["restarts"] == 0
    assert {name: file_identity(run / name) for name in sockets} == sockets
    assert json.loads(lock_path(node.workspace).read_text())["pid"] == agent
    # Its events still arrive: a crash is seen, restarted and counted.
    os.kill(before["pid"], signal.SIGKILL)

    def restarted() -> dict | None:
        body = node.instance(0)[1]
        return body if body["ready"] and body["pid"] not in (None, before["pid"]) else None

    again = wait_until(restarted, 30, "the instance restarted and ready")
    assert again["restarts"] == 1


def test_killed_owner_is_taken_over_and_its_supervisord_reaped(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1, INSTANCE_STOP_TIMEOUT="1").start()
    node.wait_ready()
    assert node.proc is not None
    supervisord = supervisord_of(node)
    stale = [supervisord, *supervisord.children(recursive=True)]
    _, before = node.instance(0)
    try:
        # Stopped, supervisord cannot act on the parent-death SIGTERM: it is still there,
        # with its instance, when the next agent comes (the belt to those braces).
        supervisord.suspend()
        node.proc.kill()
        node.proc.wait(10)
        assert supervisord.is_running() and psutil.pid_exists(before["pid"])
        # The lock died with the agent: none of its orphans inherited it.
        assert lock_free(lock_path(node.workspace))

        node.proc = None
        node.start()
        body = node.wait_ready()
        assert body["instances"][0]["pid"] != before["pid"]
        _gone, alive = psutil.wait_procs(stale, timeout=10)
        assert alive == []
        assert "stopping stale supervisord" in node.log()
        assert f'"pid": {supervisord.pid}' in node.log()
        assert json.loads(lock_path(node.workspace).read_text())["pid"] == node.proc.pid
        assert node.stop() == 0
    finally:
        for proc in stale:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue


# The same rules, one process at a time.


@pytest.fixture
def plan_and_owner(workspace: Path) -> Iterator[tuple[object, Callable[[], subprocess.Popen]]]:
    """A plan on ``workspace`` and a starter of another process that owns the workspace."""
    settings = load_settings({"COMFYUI_CPU_ONLY": "1", "MACHINE_WORKSPACE": str(workspace)})
    plan = make_plan(settings, [])
    started: list[subprocess.Popen[str]] = []

    def start_owner() -> subprocess.Popen[str]:
        code = (
            "import signal, sys; from pathlib import Path;"
            "from services.workspace_lock import acquire;"
            f"acquire(Path({str(workspace)!r}), 'comfy-machine up');"
            "print('locked', flush=True); signal.pause()"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        return proc

    yield plan, start_owner
    for proc in started:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_reap_stale_leaves_a_live_owners_supervisord_alone(
    plan_and_owner: tuple, workspace: Path
) -> None:
    plan, start_owner = plan_and_owner
    owner = start_owner()
    # A "supervisord" on this workspace's conf, as the pidfile names it.
    fake = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()", str(plan.supervisor_conf)]
    )
    try:
        (plan.run_dir / "supervisord.pid").write_text(f"{fake.pid}\n")
        assert live_owner(workspace) == json.loads(lock_path(workspace).read_text())
        with pytest.raises(WorkspaceBusy, match=f"in use by pid {owner.pid} "):
            reap_stale(plan, timeout=2)
        assert fake.poll() is None
        with pytest.raises(WorkspaceBusy) as busy:
            acquire(workspace, "comfy-machine install")
        assert busy.value.exit_code == 2
        # Once the owner is provably dead (its lock is free), its supervisord is stale.
        owner.kill()
        owner.wait()
        assert live_owner(workspace) is None
        assert reap_stale(plan, timeout=2) == fake.pid
        fake.wait(5)  # reaped (psutil collected its status: Popen sees no code of its own)
        assert not psutil.pid_exists(fake.pid)
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait()


def test_reap_stale_in_the_owner_itself(plan_and_owner: tuple, workspace: Path) -> None:
    plan, _ = plan_and_owner
    with acquire(workspace, "comfy-machine up") as lock:
        assert lock.held and live_owner(workspace) is None  # we are the owner
        assert reap_stale(plan, timeout=2) is None  # nothing stale: no pidfile
    assert not lock.held and lock_free(lock_path(workspace))


async def test_event_receiver_removes_only_the_socket_it_bound(workspace: Path) -> None:
    path = workspace / "events.sock"
    first = EventReceiver(path, lambda event: None)
    await first.start()
    # Another agent replaced the socket (what a second `up` used to do): ours is gone.
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as theirs:
        theirs.bind(str(path))
        identity = file_identity(path)
        first.close()
        assert file_identity(path) == identity  # theirs survives our shutdown
    second = EventReceiver(path, lambda event: None)
    await second.start()  # a dead owner's socket is replaced
    second.close()
    assert not path.exists()
    await asyncio.sleep(0)


def test_unlink_if_same(workspace: Path) -> None:
    path = workspace / "f"
    path.write_text("a")
    mine = file_identity(path)
    assert not unlink_if_same(path, None)
    with path.open() as still_open:  # as a bound socket does, keeps its inode from reuse
        path.unlink()
        path.write_text("b")  # someone else's file at the same path
        assert file_identity(path) != mine and not unlink_if_same(path, mine)
        assert path.read_text() == "b" and still_open.read() == "a"
    assert unlink_if_same(path, file_identity(path)) and not path.exists()
