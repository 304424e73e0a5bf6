"""A warm boot's head start: supervisord started from the last boot's record before the agent
reads its settings, kept only when the settings give the very same launch (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from tests.integration.test_node import events
from tests.support import Node, wait_until


def booted_twice(node: Node) -> list[dict[str, Any]]:
    """Boot, stop, clear the log, boot again until ready; the second boot's log."""
    node.start().wait_ready()
    assert node.stop() == 0
    node.log_path.write_text("")
    node.start().wait_ready()
    return events(node)


def started(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in log if e["event"] == "supervisord started"]


def test_warm_boot_starts_supervisord_before_reading_its_settings(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1)
    record = node.workspace / "run" / "head-start.json"
    log = booted_twice(node)
    assert record.stat().st_mode & 0o777 == 0o600
    # The first thing the agent did, before Settings: supervisord, starting the instance.
    assert log[0]["event"] == "supervisord started" and log[0]["ahead_of_settings"], log
    assert log[0]["starts_at_once"] == ["comfyui-gpu0"]
    names = [e["event"] for e in log]
    assert "supervisord adopted from the head start" in names and len(started(log)) == 1
    # The boot kept that very process: the ready instance is its child, started once.
    body = node.wait_ready()
    inst = body["instances"][0]
    assert psutil.Process(inst["pid"]).ppid() == log[0]["pid"]
    assert inst["restarts"] == 0 and inst["smoke"]["pid"] == inst["pid"]
    _, install = node.get("/health/comfyui/installation")
    assert {step["status"] for step in install["steps"]} == {"skipped"}


def test_a_changed_setting_means_no_head_start(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1)
    node.start().wait_ready()
    assert node.stop() == 0
    node.log_path.write_text("")
    node.env["PROBE_INTERVAL"] = "0.3"
    node.start().wait_ready()
    log = events(node)
    (refused,) = [e for e in log if e["event"] == "no head start"]
    assert "inputs changed" in refused["reason"]
    (early,) = started(log)  # the usual warm start, after the settings
    assert "ahead_of_settings" not in early and early["starts_at_once"] == ["comfyui-gpu0"]


def test_a_head_start_the_settings_disown_is_stopped_before_anything_is_reported(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1)
    node.start().wait_ready()
    assert node.stop() == 0
    node.log_path.write_text("")
    # The record still matches the inputs, but what it would start is not what the settings
    # plan (as if the agent's conf rendering had changed under an unchanged digest).
    path = node.workspace / "run" / "head-start.json"
    record = json.loads(path.read_text())
    record["conf"] += "\n; not what the settings plan\n"
    path.write_text(json.dumps(record))
    node.start()
    body = node.wait_ready()
    log = events(node)
    names = [e["event"] for e in log]
    ahead, usual = started(log)
    assert ahead["ahead_of_settings"] and "ahead_of_settings" not in usual
    stopped = names.index("head start stopped")
    assert "another supervisord.conf" in log[stopped]["reason"]
    assert stopped < names.index("smoke passed") and stopped < names.index(
        "supervisord started", names.index("supervisord started") + 1
    )
    assert not psutil.pid_exists(ahead["pid"]) or psutil.Process(ahead["pid"]).status() == (
        psutil.STATUS_ZOMBIE
    )
    assert psutil.Process(body["instances"][0]["pid"]).ppid() == usual["pid"]
    conf = (node.workspace / "run" / "supervisord.conf").read_text()
    assert "not what the settings plan" not in conf
    # The boot left a record true to its settings again.
    assert "not what the settings plan" not in path.read_text()


CONF = """[unix_http_server]
file={dir}/s.sock
[supervisord]
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:sleeper]
command=sleep 60
autostart=true
startsecs=0
"""


def _log_time(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_supervisord_starts_its_programs_without_being_asked(tmp_path: Path) -> None:
    # As shipped, supervisord's first poll waits 1 s before its autostart programs start
    # unless a client wakes it; a head start's supervisord has nobody asking it for a while.
    (tmp_path / "s.conf").write_text(CONF.format(dir=tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.supervisor.supervisord", "-n", "-c",
         str(tmp_path / "s.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        log = tmp_path / "supervisord.log"
        spawned = wait_until(
            lambda: [ln for ln in log.read_text().splitlines() if "spawned: 'sleeper'" in ln],
            30, "the program spawned")
        up = next(ln for ln in log.read_text().splitlines() if "supervisord started" in ln)
        assert (_log_time(spawned[0]) - _log_time(up)).total_seconds() < 0.5
    finally:
        proc.terminate()
        proc.wait(30)
