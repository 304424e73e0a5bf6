"""The stand-in's websocket ``status`` events against the recordings of ComfyUI 0.3.64: the
part of /ws the agent's queue feed (services/queue_feed.py) follows.

As in ComfyUI: a ``status`` with ``sid`` on connect (generated when the client sends no
``clientId``), then a broadcast ``status`` without ``sid`` to every socket on each queue
change (queued, taken to run, finished, queue cleared), ``queue_remaining`` counting the
running and pending prompts together; the ``executing``/``execution_*`` events go only to the
socket of the client that posted the prompt."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.standin.test_standin import DEADLINE_S, fetch, key_types, ws_until_done
from tests.support import recording


def recorded_statuses(name: str) -> list[dict[str, Any]]:
    """The ``status`` messages of a recorded websocket session, as sent (type and data)."""
    return [
        {"type": m["type"], "data": m["data"]}
        for m in recording(name)["messages"]
        if m["type"] == "status"
    ]


def statuses(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") == "status"]


def remaining(messages: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["status"]["exec_info"]["queue_remaining"] for m in statuses(messages)]


async def drain_ws(ws: aiohttp.ClientWebSocketResponse, quiet_s: float = 0.3) -> list[Any]:
    """Every text message until the socket has been quiet for ``quiet_s``."""
    out: list[Any] = []
    while True:
        try:
            msg = await ws.receive(timeout=quiet_s)
        except TimeoutError:
            return out
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(json.loads(msg.data))


async def test_status_events_match_the_recordings(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    body = recording("POST_prompt_smoke.json")["request"]["json_body"]
    client_id = body["client_id"]
    expected = recorded_statuses("ws_messages_smoke.json")
    # A failing prompt's statuses are the same but for the client id.
    failing = recorded_statuses("ws_messages_runtime_error_fake_checkpoint.json")
    assert [m["data"]["status"] for m in failing] == [m["data"]["status"] for m in expected]
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{standin.url}/ws?clientId={client_id}") as ws,
        session.ws_connect(f"{standin.url}/ws") as observer,
    ):
        first = json.loads((await ws.receive(timeout=DEADLINE_S)).data)
        assert first == expected[0]  # {"status": {"exec_info": {"queue_remaining": 0}}, "sid": ...}
        hello = json.loads((await observer.receive(timeout=DEADLINE_S)).data)
        assert key_types(hello) == key_types(expected[0])
        sid = hello["data"]["sid"]
        assert len(sid) == 32 and int(sid, 16) >= 0  # a generated uuid4 hex, as ComfyUI's

        status, posted, _ = await fetch(session, standin.url + "/prompt", method="POST", json=body)
        assert status == 200
        messages = await ws_until_done(ws, posted["prompt_id"])
        got = statuses(messages)
        # queued (1), taken to run (1), finished (0): the recorded values, shapes and order.
        assert [m["data"] for m in got] == [m["data"] for m in expected[1:]]
        assert [key_types(m) for m in got] == [key_types(m) for m in expected[1:]]
        types = [m["type"] for m in messages]
        assert types.index("execution_success") < types.index("status", 2) < len(types) - 1

        # Another socket sees the same broadcasts, and none of the prompt's own events.
        seen = await drain_ws(observer)
        assert seen == got, seen


async def test_status_on_every_queue_change(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    slow = [recording(f"POST_prompt_slow_{i}.json")["request"]["json_body"] for i in (1, 2)]
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{standin.url}/ws?clientId=queue-watcher") as ws,
    ):
        assert remaining([json.loads((await ws.receive(timeout=DEADLINE_S)).data)]) == [0]
        for body in slow:
            status, _, _ = await fetch(session, standin.url + "/prompt", method="POST", json=body)
            assert status == 200
        # One running, one queued: a status for each put and for the first taken to run (in
        # either order: 1, 1, 2 or 1, 2, 2); the first image takes over a second.
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while True:
            _, queue, _ = await fetch(session, standin.url + "/queue")
            if queue["queue_running"] or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        assert (len(queue["queue_running"]), len(queue["queue_pending"])) == (1, 1)
        events = await drain_ws(ws, quiet_s=0.2)
        assert remaining(events) in ([1, 1, 2], [1, 2, 2]), events

        await fetch(session, standin.url + "/queue", method="POST", json={"clear": True})
        cleared = json.loads((await ws.receive(timeout=DEADLINE_S)).data)
        assert cleared == {"type": "status",
                           "data": {"status": {"exec_info": {"queue_remaining": 1}}}}
        await fetch(session, standin.url + "/interrupt", method="POST", json={})
        rest = []
        while not rest or remaining(rest)[-1:] != [0]:
            msg = await asyncio.wait_for(ws.receive(), DEADLINE_S)
            rest.append(json.loads(msg.data))
        assert all(key_types(m) == key_types(recorded_statuses("ws_messages_smoke.json")[1])
                   for m in statuses(events + rest))
