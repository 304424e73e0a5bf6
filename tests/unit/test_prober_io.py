"""What the prober reads and records around an instance's start (services/probes.py): the
start-up log answers the import check alone when it holds the start's import block
(/object_info, which holds real ComfyUI's GIL for ~0.12 s just when the smoke prompt runs, is
asked only when the log cannot tell); the smoke image is taken from disk only once whole; and
the start-up poll's refusals wake the health waiters only when the error is new."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from services.comfyui import PNG_END, PNG_SIGNATURE, saved_files, saved_image
from services.probes import InstanceProber, ProbeSettings
from services.state import CustomNodeState, MachineState, NodeStatus
from services.supervisor.states import ProcessState
from tests.support import free_port_range, recording_text
from tests.unit.test_checks import instance


def prober_for(
    state: MachineState, log_text: str, tmp_path: Path, session: aiohttp.ClientSession
) -> InstanceProber:
    """A prober of a live process whose ComfyUI port has nothing listening."""
    log_path = tmp_path / "comfyui-gpu0.log"
    log_path.write_text(log_text)
    port = free_port_range(1)
    inst = instance(0)
    inst.plan = replace(inst.plan, log_path=log_path, url=f"http://127.0.0.1:{port}")
    inst.process_state, inst.pid = ProcessState.RUNNING, os.getpid()
    state.instances = {0: inst}
    for name in ("broken_node", "comfyui-tooling-nodes"):
        state.custom_nodes[name] = CustomNodeState(name, f"file:///{name}", "main", False, True)
    return InstanceProber(state, inst, session, ProbeSettings(30.0, 1.0, 1.0), tmp_path)


async def test_a_complete_startup_log_answers_without_asking_comfyui(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = MachineState()
    async with aiohttp.ClientSession() as session:
        prober = prober_for(
            state, recording_text("startup_with_custom_nodes.log"), tmp_path, session
        )
        with caplog.at_level(logging.WARNING):
            await prober._check_imports(os.getpid())
    broken, tooling = state.custom_nodes["broken_node"], state.custom_nodes["comfyui-tooling-nodes"]
    assert broken.status is NodeStatus.FAILED and broken.import_checked
    assert broken.error == "import failed: No module named 'nonexistent_dep'"
    assert tooling.status is NodeStatus.OK and tooling.import_checked
    # Asking /object_info of a port with nothing behind it would have said so.
    assert "object_info unavailable" not in caplog.text


async def test_without_the_log_block_object_info_is_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = MachineState()
    async with aiohttp.ClientSession() as session:
        prober = prober_for(state, "Starting server\n", tmp_path, session)
        with caplog.at_level(logging.WARNING):
            await prober._check_imports(os.getpid())
    assert "object_info unavailable" in caplog.text
    # Neither source could tell: nothing is claimed about either node.
    assert not any(n.import_checked for n in state.custom_nodes.values())


def test_the_smoke_image_counts_only_whole_and_of_its_own_prefix(tmp_path: Path) -> None:
    """SaveImage names files ``{stem}_{counter:05}_.png``; one it is still writing has no IEND."""
    whole = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" + bytes(17) + PNG_END
    (tmp_path / "comfyui-gpu1-abc_00001_.png").write_bytes(whole)  # another smoke's
    assert saved_image(tmp_path, "comfyui-gpu0-abc") is None
    assert saved_image(tmp_path / "missing", "comfyui-gpu0-abc") is None
    part = tmp_path / "comfyui-gpu0-abc_00001_.png"
    part.write_bytes(whole[:-6])
    assert saved_image(tmp_path, "comfyui-gpu0-abc") is None
    assert saved_files(tmp_path, "comfyui-gpu0-abc") == [part]  # what the smoke then removes
    part.write_bytes(whole)
    assert saved_image(tmp_path, "comfyui-gpu0-abc") == part


async def test_refused_start_up_polls_wake_the_waiters_once(tmp_path: Path) -> None:
    state = MachineState()
    async with aiohttp.ClientSession() as session:
        prober = prober_for(state, "", tmp_path, session)
        pid = os.getpid()
        before = state.version
        for _ in range(3):
            assert not await prober._probe(pid, starting=True)
        starting = state.version - before
        assert not await prober._probe(pid)  # a running instance's failures are each news
    inst = state.instances[0]
    assert starting == 1 and state.version - before == 2
    assert inst.probe_failures == 4 and inst.last_probe is not None and not inst.last_probe.ok
