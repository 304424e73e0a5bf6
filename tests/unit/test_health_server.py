"""The health API over real HTTP (aiohttp test server) against a MachineState."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient

from health.server import create_app
from services.state import MachineState, Phase
from services.supervisor.states import ProcessState
from tests.unit.test_checks import instance, make_ready, node


async def client_for(aiohttp_client, state: MachineState) -> TestClient:  # type: ignore[no-untyped-def]
    return await aiohttp_client(create_app(state))


async def test_wait_returns_as_soon_as_ready(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    inst = instance(0)
    state = node(inst, phase=Phase.STARTING)
    client = await client_for(aiohttp_client, state)

    def become_ready() -> None:
        make_ready(inst)
        state.set_phase(Phase.RUNNING)

    asyncio.get_running_loop().call_later(0.2, become_ready)
    started = time.monotonic()
    resp = await client.get("/health/comfyui", params={"wait": "30"})
    elapsed = time.monotonic() - started
    assert resp.status == 200 and (await resp.json())["status"] == "ready"
    assert 0.15 < elapsed < 2.0  # woken by the change, not by a poll period or the deadline


async def test_wait_ends_with_503_and_reasons(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    client = await client_for(aiohttp_client, node(instance(0), phase=Phase.STARTING))
    resp = await client.get("/health/comfyui/instances/0", params={"wait": "0.2"})
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "starting" and body["reasons"]


async def test_wait_released_when_node_stops(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    state = node(instance(0), phase=Phase.STARTING)
    client = await client_for(aiohttp_client, state)
    asyncio.get_running_loop().call_later(0.1, state.set_phase, Phase.STOPPING)
    started = time.monotonic()
    resp = await client.get("/health/comfyui", params={"wait": "30"})
    assert resp.status == 503 and time.monotonic() - started < 2.0


async def test_errors_are_json(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    client = await client_for(aiohttp_client, node(make_ready(instance(0))))
    cases = {
        "/health/comfyui/instances/7": 404,
        "/health/comfyui/instances/abc": 400,
        "/health/comfyui?wait=abc": 400,
        "/health/comfyui?wait=-1": 400,
        "/health/comfyui?wait=nan": 400,
        "/no/such/route": 404,
    }
    for path, status in cases.items():
        resp = await client.get(path)
        assert resp.status == status, path
        assert resp.content_type == "application/json", path
        body = await resp.json()
        assert body["status"] == "error" and body["error"], path
    resp = await client.get("/health/comfyui/instances/7")
    assert (await resp.json())["known_gpus"] == [0]
    resp = await client.post("/health/comfyui")
    assert resp.status == 405 and resp.content_type == "application/json"


async def test_every_endpoint_answers(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    client = await client_for(aiohttp_client, node(make_ready(instance(0))))
    for path in (
        "/health/comfyui",
        "/health/comfyui/installation",
        "/health/comfyui/instances",
        "/health/comfyui/instances/0",
        "/health/comfyui/models",
        "/livez",
        "/readyz",
    ):
        resp = await client.get(path)
        body = await resp.json()
        assert resp.status == 200, path
        assert {"status", "phase", "reasons"} <= body.keys(), path
        assert resp.headers["Cache-Control"] == "no-store"


async def test_wait_answers_at_once_when_only_someone_acting_can_help(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    sick = instance(1)
    state = node(instance(0), sick, phase=Phase.STARTING)
    client = await client_for(aiohttp_client, state)
    # Quarantined while a waiter waits on that GPU: answered at the change, not at the end.
    asyncio.get_running_loop().call_later(0.1, lambda: (
        setattr(sick, "quarantined", "GPU GPU-1 quarantined: Xid 79"), state.changed()))
    started = time.monotonic()
    resp = await client.get("/health/comfyui/instances/1", params={"wait": "30"})
    body = await resp.json()
    assert resp.status == 503 and body["final"] is True and "Xid 79" in body["final_reason"]
    assert time.monotonic() - started < 1.0
    # A FAILED node answers every waiter at once.
    state.set_phase(Phase.FAILED, "install failed", "installing")
    for path in ("/health/comfyui", "/readyz", "/health/comfyui/instances/0"):
        started = time.monotonic()
        resp = await client.get(path, params={"wait": "30"})
        body = await resp.json()
        assert resp.status == 503 and body["final"] is True, path
        assert "install failed" in body["final_reason"]
        assert time.monotonic() - started < 1.0, path


async def test_wait_since_answers_on_each_change(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    inst = instance(0)
    state = node(inst)
    client = await client_for(aiohttp_client, state)
    resp = await client.get("/health/comfyui/instances/0", params={"wait": "30", "since": ""})
    first = await resp.json()  # no answer has progress_token "": at once
    assert first["state"] == "STOPPED" and first["progress_token"]
    # A probe-like change does not release it; a state change does.
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, state.changed)
    loop.call_later(0.3, lambda: (setattr(inst, "process_state", ProcessState.STARTING),
                                  setattr(inst, "pid", 7), state.changed()))
    started = time.monotonic()
    resp = await client.get(
        "/health/comfyui/instances/0", params={"wait": "30", "since": first["progress_token"]}
    )
    body = await resp.json()
    assert body["state"] == "STARTING" and body["progress_token"] != first["progress_token"]
    assert 0.25 < time.monotonic() - started < 2.0


async def test_readyz_is_small_and_answers_follow_each_change(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    inst = instance(0)
    state = node(inst)
    client = await client_for(aiohttp_client, state)
    full = await (await client.get("/health/comfyui")).json()
    resp = await client.get("/readyz")
    small = await resp.json()
    assert resp.status == 503 and "instances" not in small and small["instance_count"] == 1
    assert small["progress_token"] == full["progress_token"]  # ?since= works the same
    make_ready(inst)
    state.changed()  # a cached answer never outlives a change
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["ready_instances"] == 1
