"""A real node: supervisord, stand-in instances installed from a local git repo, real signals."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import Node, http_json, squat, wait_until


def test_boot_all_ready_with_the_fields_workers_use(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=3).start()
    body = node.wait_ready()
    assert body["status"] == "ready" and body["phase"] == "READY" and body["reasons"] == []
    assert [i["port"] for i in body["instances"]] == [node.port_start + i for i in range(3)]
    for inst in body["instances"]:
        assert inst["ready"] and inst["accepting"] and inst["state"] in ("STARTING", "RUNNING")
        assert inst["smoke"]["status"] == "passed" and inst["smoke"]["pid"] == inst["pid"]
        assert inst["last_probe"]["ok"] and inst["queue_pending"] == 0
        assert inst["restarts"] == 0
        # The URL in health reaches that very instance.
        code, stats = http_json(inst["url"] + "/system_stats")
        assert code == 200 and f"--port={inst['port']}" not in stats["system"]["argv"]
        assert str(inst["port"]) in stats["system"]["argv"]
        # The plan's environment reached the process: CPU mode hides every GPU.
        environ = psutil.Process(inst["pid"]).environ()
        assert (
            environ["CUDA_VISIBLE_DEVICES"] == "" and environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        )
    assert node.get("/livez")[0] == 200 and node.get("/readyz")[0] == 200
    code, install = node.get("/health/comfyui/installation")
    steps = {step["name"]: step for step in install["steps"]}
    assert code == 200 and steps["checkout ComfyUI"]["detail"].startswith("cloned at ")
    assert steps["resolve"]["status"] == steps["install"]["status"] == "done"
    code, models = node.get("/health/comfyui/models")
    assert code == 200 and models["configured"] is False
    # Smoke images are removed from the user's shared output folder.
    smoke_dir = node.workspace / "output" / "comfy-machine-smoke"
    assert not any(smoke_dir.glob("*.png"))
    # The supervisord socket lives in a directory only the agent's user can enter.
    assert (node.workspace / "run").stat().st_mode & 0o777 == 0o700


def test_ready_does_not_wait_for_comfyuis_first_collection(
    make_node: Callable[..., Node],
) -> None:
    """Real ComfyUI ends its first prompt, the smoke prompt, with a gc.collect() that holds
    its GIL (~0.3 s): the smoke is done once its image is whole on disk, not once ComfyUI
    answers /history again."""
    node = make_node(gpus=1, COMFYUI_STANDIN_GC_PAUSE="3").start()
    node.wait_ready()
    _, inst = node.instance(0)
    assert inst["smoke"]["status"] == "passed" and inst["smoke"]["duration_s"] < 1.5, inst
    assert not any((node.workspace / "output" / "comfy-machine-smoke").glob("*.png"))


def test_kill_9_is_503_within_a_second_then_ready_again(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    node.wait_ready()
    _, before = node.instance(1)
    killed_at = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    code, body = wait_until(
        lambda: (lambda r: r if r[0] == 503 else None)(node.instance(1)), 1.0, "gpu 1 to answer 503"
    )
    assert time.monotonic() - killed_at < 1.0
    assert body["ready"] is False and "exited" in body["reasons"][0]
    code, overall = node.get("/health/comfyui")
    assert code == 200 and overall["status"] == "degraded"  # gpu 0 still serves
    assert node.instance(0)[0] == 200
    code, after = node.get("/health/comfyui/instances/1?wait=30")
    assert code == 200 and after["ready"] and after["restarts"] >= 1
    assert after["pid"] != before["pid"] and after["smoke"]["pid"] == after["pid"]


def test_a_hung_instance_is_not_ready_until_it_answers_again(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=2, PROBE_TIMEOUT="1").start()
    node.wait_ready()
    _, before = node.instance(1)
    os.kill(before["pid"], signal.SIGSTOP)  # alive (no exit to see) but answering nothing
    try:
        code, body = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(node.instance(1)), 10, "gpu 1 503"
        )
        assert body["ready"] is False and body["last_probe"]["ok"] is False, body
        assert node.instance(0)[0] == 200  # the other one serves on
    finally:
        os.kill(before["pid"], signal.SIGCONT)
    code, after = node.get("/health/comfyui/instances/1?wait=30")
    assert code == 200 and after["ready"] and after["pid"] == before["pid"]


def test_crash_loop_ends_fatal_with_log_tail(make_node: Callable[..., Node]) -> None:
    # An unknown flag makes ComfyUI (and the stand-in) exit 2 at every start. A start counts as
    # failed only if the process exits within startsecs; the stand-in needs 0.3-1.5 s (imports)
    # to get to argparse, so with the suite's startsecs of 1 a slow exit counted as RUNNING and
    # reset supervisord's retry count: FATAL could take any time. The default (10 s) is exact.
    node = make_node(
        gpus=1,
        COMFYUI_ARGS="--no-such-flag",
        INSTANCE_START_RETRIES="2",
        INSTANCE_STARTSECS="10",
    ).start()

    def fatal() -> dict | None:
        # The log tail is read from supervisord right after the FATAL event lands.
        _code, body = node.instance(0)
        return body if body["state"] == "FATAL" and body["log_tail"] else None

    body = wait_until(fatal, 30, "instance FATAL with its log tail")
    assert body["status"] == "failed" and not body["ready"]
    assert "FATAL" in body["reasons"][0]
    assert "unrecognized arguments: --no-such-flag" in body["reasons"][0]
    code, overall = node.get("/health/comfyui")
    assert code == 503 and overall["status"] == "failed"
    assert node.get("/livez")[0] == 200  # the agent and supervisord are fine


def test_taken_port_blocks_only_that_instance(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2)
    squatter = squat(node.port_start + 1)
    try:
        node.start()
        wait_until(lambda: node.instance(0)[0] == 200, 60, "gpu 0 ready")
        code, overall = node.get("/health/comfyui")
        assert code == 200 and overall["status"] == "degraded"
        code, blocked = node.instance(1)
        assert code == 503 and blocked["status"] == "failed"
        reason = blocked["reasons"][0]
        assert f"port {node.port_start + 1}" in reason and "already in use" in reason
        assert f"pid {os.getpid()}" in reason  # names who holds it
    finally:
        squatter.close()
    # Freed: the agent keeps checking and starts it.
    code, body = node.get("/health/comfyui/instances/1?wait=30")
    assert code == 200 and body["ready"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_stops_everything_cleanly(make_node: Callable[..., Node], loop: str) -> None:
    node = make_node(gpus=2, MACHINE_EVENT_LOOP=loop).start()
    node.wait_ready()
    assert node.proc is not None
    maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert ("uvloop" in maps) == (loop == "uvloop")
    tree = node.tree()
    assert len(tree) >= 5  # agent, supervisord, event listener, 2 instances
    # supervisord's own umask (services/supervisor/supervisord.py): logs for owner and group.
    for log in (node.workspace / "logs").glob("*.log"):
        assert log.stat().st_mode & 0o027 == 0, f"{log} is {oct(log.stat().st_mode)}"
    assert node.stop(signal.SIGTERM) == 0
    _gone, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    # Instances got SIGINT (ComfyUI's clean shutdown), not SIGTERM.
    logs = sorted((node.workspace / "logs").glob("comfyui-gpu*.log"))
    assert [log.name for log in logs] == ["comfyui-gpu0.log", "comfyui-gpu1.log"]
    for log in logs:
        assert "Stopped server" in log.read_text()
    # The agent's log shows every instance reaching STOPPED (one line each).
    lines = [json.loads(line) for line in node.log_path.read_text().splitlines()
             if line.startswith("{")]
    stopped = [e["instance"] for e in lines if e["event"] == "process state"
               and e["to"] == "STOPPED"]
    assert sorted(stopped) == ["comfyui-gpu0", "comfyui-gpu1"]


def test_sigkill_of_the_agent_leaves_no_orphan(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    node.wait_ready()
    children = node.tree()[1:]
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"orphans after SIGKILL of the agent: {alive}"


def events(node: Node) -> list[dict[str, Any]]:
    """The agent's log, one dict per JSON line, in order."""
    return [json.loads(line) for line in node.log_path.read_text().splitlines()
            if line.startswith("{")]


def test_warm_boot_skips_install_and_comes_back(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    node.wait_ready()
    assert node.stop() == 0
    node.log_path.write_text("")
    squatter = squat(node.port_start + 1)
    try:
        node.start()
        wait_until(lambda: node.instance(0)[0] == 200, 60, "gpu 0 ready")
        _, install = node.get("/health/comfyui/installation")
        assert {step["status"] for step in install["steps"]} == {"skipped"}
        # supervisord (starting the instance whose port is free) came before everything else
        # the boot does, the health server included; the busy port's instance waits its turn.
        names = [e["event"] for e in events(node)]
        assert names.index("supervisord started") < names.index("health server"), names
        started = next(e for e in events(node) if e["event"] == "supervisord started")
        assert started["starts_at_once"] == ["comfyui-gpu0"]
        code, blocked = node.instance(1)
        assert code == 503 and "already in use" in blocked["reasons"][0]
    finally:
        squatter.close()
    code, body = node.get("/health/comfyui/instances/1?wait=30")
    assert code == 200 and body["ready"]


def test_sigterm_during_a_warm_start_stops_everything(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    node.wait_ready()
    assert node.stop() == 0
    node.log_path.write_text("")
    node.start()
    # Stopped while supervisord and the instances start and the boot still verifies.
    wait_until(lambda: any(e["event"] == "supervisord started" for e in events(node)), 30,
               "the warm start", interval=0.005)
    tree = node.tree()
    assert node.stop(signal.SIGTERM) == 0
    _gone, alive = psutil.wait_procs(tree[1:], timeout=10)
    assert alive == [], f"left behind: {alive}"
    workspace = str(node.workspace)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any(workspace in arg for arg in p.info["cmdline"] or [])]
    assert leftovers == [], leftovers


def test_warm_boot_that_finds_the_install_changed_stops_and_installs_first(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1).start()
    first = node.wait_ready()["instances"][0]["pid"]
    assert node.stop() == 0
    node.log_path.write_text("")
    # Someone edited ComfyUI in place: the lock no longer describes what is on disk.
    main_py = node.workspace / "ComfyUI" / "main.py"
    original = main_py.read_text()
    main_py.write_text(original + "\n# edited by hand\n")
    node.start()
    body = node.wait_ready()
    assert main_py.read_text() == original  # installed again before serving
    log = events(node)
    names = [e["event"] for e in log]
    early = next(e for e in log if e["event"] == "supervisord started")
    assert early["starts_at_once"] == ["comfyui-gpu0"]
    stop_at = names.index(next(n for n in names if n.startswith("warm start:")))
    # The instance the warm start began was stopped before the install; only a process started
    # after it was probed (nothing unverified was ever reported ready).
    smoke_at = names.index("smoke passed")
    assert stop_at < smoke_at
    stopped = [e for e in log[stop_at:smoke_at]
               if e["event"] == "process state" and e["to"] == "STOPPED"]
    assert [e["instance"] for e in stopped] == ["comfyui-gpu0"], log
    smoked = [e["pid"] for e in log if e["event"] == "smoke passed"]
    assert smoked == [body["instances"][0]["pid"]] and stopped[0]["pid"] not in smoked
    assert first not in smoked
    steps = {s["name"]: s for s in node.get("/health/comfyui/installation")[1]["steps"]}
    assert steps["checkout ComfyUI"]["status"] != "skipped"


# A custom node that starts a helper process which ignores SIGINT, as some real node packs do
# (servers, watchers): only the group kill after INSTANCE_STOP_TIMEOUT can end it.
SPAWNING_NODE = """
import subprocess, sys
from pathlib import Path
CHILD = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.pause()"
child = subprocess.Popen([sys.executable, "-c", CHILD])
Path("child.pid").write_text(str(child.pid))
NODE_CLASS_MAPPINGS = {}
"""


def test_instance_children_die_with_the_node(make_node: Callable[..., Node]) -> None:
    node = make_node(
        gpus=1,
        files={"custom_nodes/spawner/__init__.py": SPAWNING_NODE},
        INSTANCE_STOP_TIMEOUT="1",
    ).start()
    node.wait_ready()
    child = psutil.Process(int((node.workspace / "ComfyUI" / "child.pid").read_text()))
    assert child.is_running()
    assert node.stop(signal.SIGTERM) == 0
    _, alive = psutil.wait_procs([child], timeout=5)
    assert alive == [], "a child of ComfyUI outlived the node"


def test_children_of_a_crashed_or_orphaned_instance_are_killed(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(
        gpus=1,
        files={"custom_nodes/spawner/__init__.py": SPAWNING_NODE},
        INSTANCE_STOP_TIMEOUT="1",
    ).start()
    node.wait_ready()
    pid_file = node.workspace / "ComfyUI" / "child.pid"
    first_child = psutil.Process(int(pid_file.read_text()))
    # ComfyUI crashes: its helper must not live on beside the restarted instance.
    _, body = node.instance(0)
    os.kill(body["pid"], signal.SIGKILL)
    _, alive = psutil.wait_procs([first_child], timeout=5)
    assert alive == [], "the child of a crashed instance outlived it"
    node.get("/health/comfyui/instances/0?wait=30")
    second_child = psutil.Process(int(pid_file.read_text()))
    # The agent dies without cleaning up: supervisord stops the instance, and its child too.
    assert node.proc is not None
    node.proc.kill()
    _, alive = psutil.wait_procs([second_child], timeout=10)
    assert alive == [], "the child of an instance outlived the SIGKILLed agent"


def test_custom_node_import_failure_degrades_or_fails(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    from tests.integration.test_installer import make_repo

    broken = make_repo(tmp_path / "broken_node", {"__init__.py": "import nonexistent_dep\n"})
    working = make_repo(
        tmp_path / "working_node",
        {
            "__init__.py": "class Hello:\n    @classmethod\n    def INPUT_TYPES(cls):\n"
            "        return {'required': {}}\n    RETURN_TYPES = ()\n    FUNCTION = 'run'\n"
            "    CATEGORY = 'test'\n\nNODE_CLASS_MAPPINGS = {'Hello': Hello}\n"
        },
    )
    node = make_node(gpus=1, COMFYUI_CUSTOM_NODES=f"{broken},{working}").start()
    code, install = wait_until(
        lambda: (
            lambda r: (
                r
                if r[1]["custom_nodes"] and all(n["import_checked"] for n in r[1]["custom_nodes"])
                else None
            )
        )(node.get("/health/comfyui/installation")),
        60,
        "import check",
    )
    by_name = {n["name"]: n for n in install["custom_nodes"]}
    assert by_name["working_node"]["status"] == "ok" and by_name["working_node"]["commit"]
    assert by_name["broken_node"]["status"] == "failed"
    assert by_name["broken_node"]["error"] == "import failed: No module named 'nonexistent_dep'"
    assert code == 200 and install["status"] == "degraded"
    # Imports are checked before the smoke prompt; once that passes the node serves, degraded.
    code, body = wait_until(
        lambda: (lambda r: r if r[1]["ready_instances"] == 1 else None)(
            node.get("/health/comfyui")
        ),
        30,
        "the instance to pass its smoke prompt",
    )
    assert code == 200 and body["status"] == "degraded"
    assert any("custom node broken_node failed" in r for r in body["reasons"])
    node.stop()
    # The same node declared required: the node cannot serve.
    required = make_node(gpus=1, MACHINE_CONFIG=str(_toml(tmp_path, broken))).start()
    code, body = wait_until(
        lambda: (lambda r: r if r[0] == 503 and r[1]["status"] == "failed" else None)(
            required.get("/health/comfyui")
        ),
        60,
        "required node failure",
    )
    assert any("it is required" in r for r in body["reasons"])


def _toml(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "machine.toml"
    path.write_text(f'[[custom_nodes]]\nurl = "{url}"\nrequired = true\n')
    return path


# install.py that blocks on its first run only, so a boot can be killed in the middle of it.
BLOCKING_INSTALL = """
import signal
from pathlib import Path
Path("install-started").write_text("x")
if not Path("ran-once").exists():
    Path("ran-once").write_text("x")
    signal.pause()  # until killed
"""


def test_boot_killed_during_install_is_repaired_by_the_next(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    from tests.integration.test_installer import make_repo

    url = make_repo(
        tmp_path / "slow_node",
        {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n", "install.py": BLOCKING_INSTALL},
    )
    node = make_node(gpus=1, COMFYUI_CUSTOM_NODES=url).start()
    node_dir = node.workspace / "ComfyUI" / "custom_nodes" / "slow_node"
    wait_until(lambda: (node_dir / "install-started").exists(), 30, "install.py to start")
    installing = [p for p in node.tree() if "install.py" in " ".join(p.cmdline())]
    assert installing
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(5)
    _, alive = psutil.wait_procs(installing, timeout=10)
    assert alive == [], "install.py outlived the killed agent"
    assert not (node.workspace / "comfy-machine.lock").exists()  # never taken as done
    node.start()
    node.wait_ready()
    _, install = wait_until(
        lambda: (lambda r: r if r[1]["custom_nodes"][0]["import_checked"] else None)(
            node.get("/health/comfyui/installation")
        ),
        30,
        "import check",
    )
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["install.py slow_node"]["status"] == "done"
    assert install["custom_nodes"][0]["status"] == "ok", install["custom_nodes"][0]["error"]
    assert (node.workspace / "comfy-machine.lock").exists()


def test_supervisord_killed_fails_the_agent_and_leaves_no_instance(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=2).start()
    body = node.wait_ready()
    instances = [psutil.Process(i["pid"]) for i in body["instances"]]
    supervisord = next(p for p in node.tree() if "supervisord" in " ".join(p.cmdline()))
    supervisord.kill()
    assert node.proc is not None
    assert node.proc.wait(30) == 1  # the agent cannot supervise: it says so and exits
    _, alive = psutil.wait_procs(instances, timeout=10)
    assert alive == [], "instances orphaned by supervisord outlived the agent"
    assert "supervisord exited unexpectedly" in node.log()
