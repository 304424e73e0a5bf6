"""The event relay over real pipes and a real datagram socket."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

from services.supervisor.events import ProcessEvent
from services.supervisor.listener import reap_group, relay
from services.supervisor.states import ProcessState


def test_listener_relays_events_and_acks(tmp_path: Path) -> None:
    address = str(tmp_path / "events.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as agent,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        agent.bind(address)
        payload = "processname:comfyui-gpu0 groupname:comfyui from_state:RUNNING expected:0 pid:42"
        header = (
            "ver:3.0 server:supervisor serial:7 pool:l poolserial:1 "
            f"eventname:PROCESS_STATE_EXITED len:{len(payload)}\n"
        )
        stdout = io.StringIO()
        relay(io.StringIO(header + payload), stdout, sender, address)
        assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\n"
        event = ProcessEvent.from_message(json.loads(agent.recv(65536)))
    assert event is not None
    assert (event.process, event.from_state, event.to_state) == (
        "comfyui-gpu0",
        ProcessState.RUNNING,
        ProcessState.EXITED,
    )
    assert event.pid == 42 and event.expected is False and event.serial == 7


def test_listener_never_blocks_when_agent_is_gone(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        payload = "processname:x groupname:x from_state:STOPPED tries:0"
        header = f"ver:3.0 serial:1 eventname:PROCESS_STATE_STARTING len:{len(payload)}\n"
        stdout = io.StringIO()
        relay(io.StringIO(header + payload), stdout, sender, str(tmp_path / "missing.sock"))
        assert "RESULT 2\nOK" in stdout.getvalue()


def test_non_state_events_are_ignored() -> None:
    assert ProcessEvent.from_message({"event": "TICK_5", "payload": {}}) is None


def test_reap_group_kills_only_the_instances_group() -> None:
    import subprocess
    import sys

    leftover = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True
    )  # a group leader, as supervisord makes
    try:
        payload = {"groupname": "other", "pid": str(leftover.pid)}
        assert not reap_group("PROCESS_STATE_EXITED", payload, "comfyui")
        payload["groupname"] = "comfyui"
        assert not reap_group("PROCESS_STATE_RUNNING", payload, "comfyui")
        assert leftover.poll() is None
        assert reap_group("PROCESS_STATE_EXITED", payload, "comfyui")
        assert leftover.wait(5) == -9
    finally:
        leftover.kill()
        leftover.wait()
