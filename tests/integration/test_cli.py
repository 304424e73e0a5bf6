"""The command line as users run it: exit codes, output, and bad input writing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Node, free_port_range, wait_until


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "machine", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_plan_prints_instances_and_conf_and_writes_nothing(workspace: Path) -> None:
    ws = workspace / "ws"
    env = {"COMFYUI_CPU_ONLY": "1", "NUM_GPUS": "2", "MACHINE_WORKSPACE": str(ws)}
    env["COMFYUI_CUSTOM_NODES"] = "https://github.com/Acly/comfyui-tooling-nodes@v2.0.6"
    out = run_cli("plan", env=env)
    assert out.returncode == 0, out.stderr
    tooling = "https://github.com/Acly/comfyui-tooling-nodes"
    assert f"node:    comfyui-tooling-nodes: {tooling} @ v2.0.6" in out.stdout
    assert "comfyui-gpu1: gpu 1" in out.stdout and "port 8189" in out.stdout
    assert "[program:comfyui-gpu0]" in out.stdout and "CUDA_VISIBLE_DEVICES" in out.stdout
    as_json = json.loads(run_cli("plan", "--json", env=env).stdout)
    assert [i["port"] for i in as_json["plan"]["instances"]] == [8188, 8189]
    assert as_json["plan"]["instances"][0]["log_path"] == str(ws / "logs" / "comfyui-gpu0.log")
    assert "[group:comfyui]" in as_json["supervisord_conf"]
    assert as_json["custom_nodes"][0]["ref"] == "v2.0.6"
    assert not ws.exists()


def test_bad_settings_exit_2_one_line_each_nothing_written(workspace: Path) -> None:
    ws = workspace / "ws"
    env = {
        "NUM_GPUS": "abc",
        "COMFYUI_PORT_START": "70000",
        "COMFYUI_ARGS": "--port 1",
        "MACHINE_WORKSPACE": str(ws),
    }
    out = run_cli("up", env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "comfy-machine: invalid settings, nothing was started:"
    assert lines[1].strip().startswith("NUM_GPUS='abc'")
    assert lines[2].strip().startswith("COMFYUI_PORT_START='70000'")
    assert lines[3].strip().startswith("COMFYUI_ARGS='--port 1'")
    assert not ws.exists()


def test_gpu_mode_without_driver_says_how_to_develop(workspace: Path) -> None:
    ws = workspace / "ws"
    out = run_cli("up", env={"MACHINE_WORKSPACE": str(ws), "NUM_GPUS": "1"})
    assert out.returncode == 2
    assert "COMFYUI_CPU_ONLY=true" in out.stderr and "NVIDIA driver" in out.stderr
    assert not ws.exists()


def test_wait_ready_status_and_reasons(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=2).start()
    env = {"MACHINE_HEALTH_PORT": str(node.health_port), "MACHINE_HEALTH_LISTEN": "127.0.0.1"}
    out = run_cli("wait-ready", "--gpu", "1", "--timeout", "60", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gpu 1 ready: http://127.0.0.1:{node.port_start + 1}"
    assert run_cli("wait-ready", "--timeout", "30", env=env).returncode == 0
    # One line per instance, also through a pipe (scripts grep it); reasons are not cut there.
    status = run_cli("status", env=env)
    assert status.returncode == 0 and status.stdout.startswith("node: ready (phase READY")
    rows = [line.split() for line in status.stdout.splitlines() if "comfyui-gpu" in line]
    assert [(r[1], r[3], r[4]) for r in rows] == [
        ("comfyui-gpu0", "yes", str(node.port_start)),
        ("comfyui-gpu1", "yes", str(node.port_start + 1)),
    ]
    as_json = json.loads(run_cli("status", "--json", env=env).stdout)
    assert as_json["ready_instances"] == 2
    unknown = run_cli("wait-ready", "--gpu", "5", "--timeout", "5", env=env)
    assert unknown.returncode == 1 and "no instance for gpu 5" in unknown.stderr


def test_wait_ready_times_out_with_reasons(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1, COMFYUI_ARGS="--no-such-flag", INSTANCE_START_RETRIES="0").start()
    out = run_cli("wait-ready", "--timeout", "3", "--url", node.url)
    assert out.returncode == 1  # FATAL, but started again after a backoff: not hopeless
    # A progress line per change while it waits, then the reasons.
    progress, _, reasons = out.stderr.partition("not ready after 3s:\n")
    assert progress.startswith("waiting ") and reasons, out.stderr
    assert "comfyui-gpu0" in reasons


def test_wait_ready_without_a_node() -> None:
    port = free_port_range(1)
    out = run_cli("wait-ready", "--timeout", "0.5", "--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1 and "no answer from the health server" in out.stderr


def test_demo_prints_urls_when_ready_and_stops_on_ctrl_c(workspace: Path) -> None:
    health, start = free_port_range(1), free_port_range(2)
    env = {
        **os.environ,
        "MACHINE_HEALTH_PORT": str(health),
        "COMFYUI_PORT_START": str(start),
        "MACHINE_HEALTH_LISTEN": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "machine",
            "demo",
            "--gpus",
            "2",
            "--workspace",
            str(workspace / "demo"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        wait_until(
            lambda: lines.append(proc.stdout.readline()) or "Stop with" in lines[-1],
            60,
            "the demo's ready banner",
        )
        text = "".join(lines)
        assert "comfy-machine demo is ready: 2 ComfyUI stand-in instance(s)" in text
        assert f"http://127.0.0.1:{health}/health/comfyui" in text
        assert f"http://127.0.0.1:{start + 1}" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


READS_INPUT_DIR_AT_IMPORT = """\
import os
try:
    import folder_paths as paths  # ComfyUI
except ImportError:
    import model_paths as paths  # the stand-in
os.listdir(paths.get_input_directory())
NODE_CLASS_MAPPINGS = {}
"""


def test_install_reports_steps_as_json_lines_and_fails_on_a_broken_node(
    workspace: Path, standin_repo: tuple[str, str]
) -> None:
    from tests.integration.test_installer import make_repo

    url, commit = standin_repo
    # Like ComfyUI's own nodes_video.py, this node reads the input directory at import: the
    # import check must run with the directories `up` would give it.
    good = make_repo(workspace / "good", {"__init__.py": READS_INPUT_DIR_AT_IMPORT})
    broken = make_repo(workspace / "broken", {"__init__.py": "import nonexistent_dep\n"})
    env = {
        "COMFYUI_CPU_ONLY": "1",
        "COMFYUI_REPO": url,
        "COMFYUI_REF": commit,
        "COMFYUI_PYTHON": sys.executable,
        "MACHINE_WORKSPACE": str(workspace / "ws"),
        "INSTALL_MIN_FREE_GB": "0",
        "COMFYUI_CUSTOM_NODES": good,
    }
    out = run_cli("install", env=env)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    final = {e["step"]: e["status"] for e in events}
    assert final["checkout ComfyUI"] == "done" and final["checkout good"] == "done"
    assert final["import check"] == "done"
    warm = run_cli("install", env=env)
    assert warm.returncode == 0 and "warm: nothing to do" in warm.stderr
    failing = run_cli("install", env={**env, "COMFYUI_CUSTOM_NODES": f"{good},{broken}"})
    assert failing.returncode == 1
    assert "custom node broken import failed: No module named 'nonexistent_dep'" in failing.stderr


def test_workspace_that_is_a_file_exits_2_for_every_writer(workspace: Path) -> None:
    afile = workspace / "ws"
    afile.write_text("")
    env = {"MACHINE_WORKSPACE": str(afile), "COMFYUI_CPU_ONLY": "1"}
    for command in ("up", "install", "models"):
        out = run_cli(command, env=env)
        assert out.returncode == 2, (command, out.stderr)
        lines = out.stderr.splitlines()
        assert lines[0] == "comfy-machine: invalid settings, nothing was started:"
        assert lines[1].strip().startswith(
            f"MACHINE_WORKSPACE='{afile}': is a file, not a directory;"
        ), out.stderr
    demo = run_cli("demo", "--workspace", str(afile / "demo"))
    assert demo.returncode == 2 and f"--workspace='{afile / 'demo'}'" in demo.stderr


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "soon"])
def test_wait_ready_timeout_must_be_a_finite_number_of_seconds(value: str) -> None:
    port = free_port_range(1)
    start = time.monotonic()
    out = run_cli("wait-ready", "--timeout", value, "--url", f"http://127.0.0.1:{port}", timeout=20)
    assert out.returncode == 2
    assert f"argument --timeout: {value!r} is not a number of seconds >= 0" in out.stderr
    assert "health server" not in out.stderr
    assert time.monotonic() - start < 15


def test_closed_pipe_stops_quietly(workspace: Path) -> None:
    """`comfy-machine plan | head -0`: no BrokenPipeError traceback, the shell's SIGPIPE code."""
    env = {**os.environ, "COMFYUI_CPU_ONLY": "1", "NUM_GPUS": "2",
           "MACHINE_WORKSPACE": str(workspace / "ws")}
    proc = subprocess.Popen([sys.executable, "-m", "machine", "plan"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    with proc.stderr:
        stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


# `plan` in a fresh interpreter, reporting whether it loaded Settings (pydantic).
PLAN_PROBE = """
import contextlib, io, json, sys
from machine.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(), "settings": "pydantic" in sys.modules}))
"""


def test_plan_answers_again_without_settings_until_an_input_changes(tmp_path: Path) -> None:
    config = tmp_path / "machine.toml"
    config.write_text("comfyui_args = '--preview-method auto'\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "COMFYUI_CPU_ONLY": "1",
           "NUM_GPUS": "2", "MACHINE_WORKSPACE": str(tmp_path / "ws"),
           "MACHINE_CONFIG": str(config)}

    def plan(*args: str, **more: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-c", PLAN_PROBE, "plan", *args],
                             env={**env, **more}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        result: dict[str, object] = json.loads(out.stdout)
        return result

    first, again = plan(), plan()
    assert first["settings"] and not again["settings"]
    assert again["out"] == first["out"] and "port 8189" in str(first["out"])
    kept = tmp_path / "cache" / "comfy-machine" / "plan.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    # --json is its own answer, kept apart.
    as_json = plan("--json")
    assert as_json["settings"] and json.loads(str(as_json["out"]))["plan"]["cpu_only"]
    assert not plan("--json")["settings"]
    # A changed setting, in the environment or in the file, is read again.
    moved = plan(COMFYUI_PORT_START="9000")
    assert moved["settings"] and "port 9001" in str(moved["out"])
    config.write_text("comfyui_args = '--preview-method taesd'\n")
    edited = plan()
    assert edited["settings"] and "--preview-method taesd" in str(edited["out"])
    assert not plan()["settings"]
    # Half a file in the cache is no answer: computed again, and right.
    kept.write_text(kept.read_text()[:100])
    redone = plan()
    assert redone["settings"] and redone["out"] == edited["out"]


def test_plan_in_gpu_mode_is_not_kept(tmp_path: Path) -> None:
    # NVML's answer is not an input the cache can see.
    from services.gpu.fake import FakeGpu, FakeNvml

    fake = tmp_path / "nvml.json"
    FakeNvml.write(fake, [FakeGpu(uuid="GPU-fake0-0000-0000-0000-000000000000")])
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MACHINE_WORKSPACE": str(tmp_path / "ws"),
           "MACHINE_FAKE_NVML": str(fake), "COMFYUI_CPU_ONLY": "false"}
    out = run_cli("plan", env=env)
    assert out.returncode == 0, out.stderr
    assert "comfyui-gpu0: gpu 0" in out.stdout
    assert not (tmp_path / "cache" / "comfy-machine").exists()
