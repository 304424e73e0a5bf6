"""Every health body reports a documented phase, in every state of the node (never RUNNING)."""

from __future__ import annotations

import pytest

from health.server import create_app
from services.state import CustomNodeState, MachineState, ModelState, Phase, StepStatus
from tests.unit.test_checks import instance, make_ready, node

# The phases the README's Health API section lists.
DOCUMENTED = {
    "INITIALIZING", "INSTALLING", "DOWNLOADING", "STARTING", "READY", "DEGRADED", "FAILED",
    "STOPPING",
}
ENDPOINTS = (
    "/health/comfyui",
    "/readyz",
    "/livez",
    "/health/comfyui/installation",
    "/health/comfyui/models",
    "/health/comfyui/instances/0",
)


def _required_node_failed(state: MachineState) -> MachineState:
    state.custom_nodes["broken"] = CustomNodeState(
        "broken", "file:///n", "main", required=True, enabled=True, status="failed", error="x"
    )
    state.step("checkout broken").status = StepStatus.FAILED
    return state


def _model_downloading(state: MachineState) -> MachineState:
    state.models_configured = True
    state.models["checkpoints/a.safetensors"] = ModelState(
        "checkpoints/a.safetensors", "checkpoints", "a.safetensors", "https://h/a",
        "/ws/models/checkpoints/a.safetensors", True, "before_start", None, None,
        status="downloading",
    )
    return state


def _supervisord_gone(state: MachineState) -> MachineState:
    state.supervisor_up = False
    return state


STATES = {
    **{f"boot {p.value}": (lambda p=p: node(instance(0), phase=p)) for p in Phase},
    "ready": lambda: node(make_ready(instance(0))),
    "instance down": lambda: node(instance(0)),
    "one of two down": lambda: node(make_ready(instance(0)), instance(1)),
    "required node failed": lambda: _required_node_failed(node(make_ready(instance(0)))),
    "downloading": lambda: _model_downloading(node(instance(0), phase=Phase.DOWNLOADING)),
    "supervisord gone": lambda: _supervisord_gone(node(make_ready(instance(0)))),
}


@pytest.mark.parametrize("name", STATES)
async def test_every_endpoint_reports_a_documented_phase(aiohttp_client, name: str) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(create_app(STATES[name]()))
    for path in ENDPOINTS:
        resp = await client.get(path)
        body = await resp.json()
        assert body.get("phase") in DOCUMENTED, (path, resp.status, body)
