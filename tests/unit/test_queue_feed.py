"""The websocket queue feed (services/queue_feed.py) against a small ComfyUI imitation that
speaks /ws status events and /queue as ComfyUI 0.3.64 does: figures follow each change, a
dropped socket is reconnected, a failing read or a gone process never escapes the feed, and
cancelling it closes the socket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services import queue_feed
from services.comfyui import ComfyClient
from services.queue_feed import QueueFeed, queue_remaining, start_feed, stop_feed
from services.state import MachineState
from services.supervisor.states import ProcessState
from tests.unit.test_checks import instance

DEADLINE_S = 5.0


class FakeComfy:
    """/ws (a status with ``sid`` on connect, a broadcast per change) and /queue."""

    def __init__(self) -> None:
        self.running = 0
        self.pending = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.connects = 0
        self.closed = 0
        self.queue_reads = 0
        self.queue_status = 200

    def info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.running + self.pending}}

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connects += 1
        self.sockets.add(ws)
        sid = request.query["clientId"]
        hello = {"type": "status", "data": {"status": self.info(), "sid": sid}}
        await ws.send_str(json.dumps(hello))
        try:
            async for _ in ws:
                pass
        finally:
            self.sockets.discard(ws)
            self.closed += 1
        return ws

    async def queue(self, request: web.Request) -> web.Response:
        self.queue_reads += 1
        if self.queue_status != 200:
            return web.Response(status=self.queue_status)
        item = [0, "id", {}, {}, []]
        return web.json_response({"queue_running": [item] * self.running,
                                  "queue_pending": [item] * self.pending})

    async def set(self, running: int, pending: int, extra: list[str] | None = None) -> None:
        """Change the queue and broadcast, as ComfyUI's ``queue_updated``."""
        self.running, self.pending = running, pending
        for ws in list(self.sockets):
            for text in extra or []:
                await ws.send_str(text)
            await ws.send_str(json.dumps({"type": "status", "data": {"status": self.info()}}))

    async def drop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/queue", self.queue)
        return app


async def until(predicate: Callable[[], Any], what: str) -> float:
    """Seconds until ``predicate`` holds (polled every ms), or fail."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > DEADLINE_S:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


@pytest.fixture
async def feed_env(aiohttp_server):  # type: ignore[no-untyped-def]
    fake = FakeComfy()
    server = await aiohttp_server(fake.app())
    inst = instance(0)
    inst.plan = replace(inst.plan, url=str(server.make_url("")).rstrip("/"))
    inst.process_state, inst.pid = ProcessState.RUNNING, 4242
    state = MachineState()
    state.instances = {0: inst}
    async with aiohttp.ClientSession() as session:
        client = ComfyClient(session, inst.plan.url, 2.0)
        feed, task = start_feed(state, inst, 4242, session, client, 2.0)
        try:
            yield fake, state, inst, feed, task
        finally:
            await stop_feed(task)


def test_queue_remaining_reads_status_messages_only() -> None:
    status = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 2}}}}
    assert queue_remaining(json.dumps(status)) == 2
    with_sid = {"type": "status", "data": {**status["data"], "sid": "abc"}}
    assert queue_remaining(json.dumps(with_sid)) == 2
    for other in (
        {"type": "executing", "data": {"node": None, "prompt_id": "x"}},
        {"type": "status", "data": {"status": {}}},
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": True}}}},
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": -1}}}},
        {"type": "status", "data": None},
        [1, 2],
    ):
        assert queue_remaining(json.dumps(other)) is None, other
    assert queue_remaining("not json") is None


def test_the_feed_parses_the_recorded_status_messages() -> None:
    from tests.support import recording

    for name in ("ws_messages_smoke.json", "ws_messages_runtime_error_fake_checkpoint.json"):
        messages = recording(name)["messages"]
        seen = [queue_remaining(json.dumps({"type": m["type"], "data": m["data"]}))
                for m in messages]
        assert [s for s in seen if s is not None] == [
            m["data"]["status"]["exec_info"]["queue_remaining"]
            for m in messages if m["type"] == "status"
        ] == [0, 1, 1, 0]


async def test_figures_follow_each_change(feed_env) -> None:  # type: ignore[no-untyped-def]
    fake, state, inst, feed, _ = feed_env
    await until(lambda: feed.live and inst.queue_running == 0, "the connect status applied")
    assert (inst.queue_running, inst.queue_pending) == (0, 0)
    assert fake.queue_reads == 0, "an empty queue needs no /queue read"

    version = state.version
    await fake.set(1, 2, extra=[json.dumps({"type": "progress", "data": {"value": 1}})])
    took = await until(lambda: (inst.queue_running, inst.queue_pending) == (1, 2), "1 + 2")
    assert took < 0.1 and state.version > version
    await fake.set(1, 0)
    await until(lambda: (inst.queue_running, inst.queue_pending) == (1, 0), "1 + 0")
    reads = fake.queue_reads
    await fake.set(0, 0)
    await until(lambda: (inst.queue_running, inst.queue_pending) == (0, 0), "empty again")
    assert fake.queue_reads == reads
    assert feed.connects == 1


async def test_a_dropped_socket_is_reconnected(feed_env) -> None:  # type: ignore[no-untyped-def]
    fake, _, inst, feed, _ = feed_env
    await until(lambda: feed.live, "live")
    await fake.drop()
    await until(lambda: not feed.live, "not live after the drop")
    fake.running, fake.pending = 1, 0  # changed while no socket was up
    await until(lambda: fake.connects == 2 and feed.live, "reconnected")
    await until(lambda: inst.queue_running == 1, "the connect status of the new socket")


async def test_a_failing_queue_read_hands_back_to_the_probe(feed_env) -> None:  # type: ignore[no-untyped-def]
    fake, _, inst, feed, task = feed_env
    await until(lambda: feed.live, "live")
    fake.queue_status = 500
    await fake.set(1, 0)
    await until(lambda: not feed.live, "not live while /queue fails")
    assert not task.done()
    fake.queue_status = 200
    await fake.set(1, 1)
    await until(lambda: feed.live and inst.queue_pending == 1, "live again")


async def test_a_gone_process_ends_the_feed_without_writing(feed_env) -> None:  # type: ignore[no-untyped-def]
    fake, _, inst, feed, task = feed_env
    await until(lambda: feed.live, "live")
    inst.pid, inst.queue_running = 4343, None  # a new process: its figures are not ours
    await fake.set(1, 0)
    await fake.drop()
    await asyncio.wait_for(task, DEADLINE_S)
    assert inst.queue_running is None and not feed.live


async def test_stop_closes_the_socket(feed_env) -> None:  # type: ignore[no-untyped-def]
    fake, _, _, feed, task = feed_env
    await until(lambda: feed.live, "live")
    await stop_feed(task)
    assert task.cancelled() and not feed.live
    await until(lambda: fake.closed == 1 and not fake.sockets, "the server saw the close")


async def test_unreachable_instance_backs_off_and_stays_guarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_feed, "RECONNECT_MAX_S", 0.2)
    inst = instance(0)
    inst.plan = replace(inst.plan, url="http://127.0.0.1:9")  # nothing listens there
    inst.process_state, inst.pid = ProcessState.RUNNING, 7
    state = MachineState()
    async with aiohttp.ClientSession() as session:
        feed = QueueFeed(state, inst, 7, session, ComfyClient(session, inst.plan.url, 1.0), 1.0)
        task = asyncio.create_task(feed.run())
        with pytest.raises(TimeoutError):  # it keeps trying: never ends, never crashes
            await asyncio.wait_for(asyncio.shield(task), 0.8)
        assert not task.done() and feed.connects == 0 and not feed.live
        await stop_feed(task)
    assert task.cancelled()
