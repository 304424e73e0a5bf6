"""Live queue figures from an instance's websocket (``/ws``).

ComfyUI broadcasts ``{"type": "status", "data": {"status": {"exec_info": {"queue_remaining":
N}}}}`` to every socket whenever its queue changes (a prompt queued, taken to run, finished,
deleted, the queue cleared), and once on connect (with ``sid``). ``queue_remaining`` counts the
running and the pending prompts together. To split it, the feed reads ``/queue`` once per
change (loopback, a few ms; changes in a burst are coalesced into one read); an empty queue
(``queue_remaining: 0``) needs no read. Not the ``executing``/``execution_*`` events: ComfyUI
sends those only to the socket of the client that posted the prompt, never to ours.

One feed per process (a new pid gets a new socket). The HTTP probe stays the liveness check,
and the queue's source while the feed is not ``live`` (before its first status, after the
socket dropped, after a failed read); the feed reconnects with a bounded backoff. Nothing it
meets escapes :meth:`QueueFeed.run` but its cancellation: a broken feed never stops the prober.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import aiohttp

from services.comfyui import ComfyApiError, ComfyClient, QueueDepth
from services.state import InstanceState, MachineState

log = logging.getLogger(__name__)

RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 5.0
# Pings on an idle socket: a wedged or vanished peer closes it within this (+ half of it).
HEARTBEAT_S = 10.0
# Preview and SaveImageWebsocket frames reach every socket for prompts posted without a
# client_id; one past this closes the socket (and the feed reconnects).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def queue_remaining(text: str) -> int | None:
    """``exec_info.queue_remaining`` of a ``status`` message; None for any other message."""
    try:
        message = json.loads(text)
        if not isinstance(message, dict) or message.get("type") != "status":
            return None
        remaining = message["data"]["status"]["exec_info"]["queue_remaining"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(remaining, bool) or not isinstance(remaining, int) or remaining < 0:
        return None
    return remaining


class QueueFeed:
    """Follows one process's websocket and writes its queue figures into the state."""

    def __init__(
        self,
        state: MachineState,
        inst: InstanceState,
        pid: int,
        session: aiohttp.ClientSession,
        client: ComfyClient,
        timeout: float,
    ) -> None:
        self._state = state
        self._inst = inst
        self._pid = pid
        self._session = session
        self._client = client
        self._timeout = timeout
        self._url = inst.plan.url.rstrip("/") + f"/ws?clientId=comfy-machine-{uuid.uuid4().hex}"
        # True while the socket is up and the figures it wrote are current: the probe leaves
        # the queue figures alone meanwhile.
        self.live = False
        self._remaining: int | None = None
        self._seq = 0  # status messages seen on this socket
        self._dirty = asyncio.Event()
        self.connects = 0  # sockets opened (for logs and tests)

    def _alive(self) -> bool:
        return self._inst.pid == self._pid and self._inst.process_alive

    async def run(self) -> None:
        """Until cancelled or the process is gone: connect, follow, reconnect with backoff."""
        delay = RECONNECT_INITIAL_S
        failures = 0
        try:
            while self._alive() and not self._session.closed:  # closed: the agent is stopping
                error: str | None = None
                try:
                    got_status = await self._follow_socket()
                except asyncio.CancelledError:
                    raise
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    got_status, error = False, f"{type(exc).__name__}: {exc}"
                except Exception as exc:  # a bug here must not take the prober down
                    got_status, error = False, f"{type(exc).__name__}: {exc}"
                    log.exception("queue feed failed", extra={"fields": self._fields()})
                finally:
                    self.live = False
                if got_status:
                    delay, failures = RECONNECT_INITIAL_S, 0
                failures += 1
                if not self._alive() or self._session.closed:
                    return
                log.log(
                    logging.INFO if failures == 1 else logging.DEBUG,
                    "queue feed disconnected; the HTTP probe keeps the queue figures meanwhile",
                    extra={"fields": {**self._fields(), "error": error, "retry_in_s": delay}},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
        finally:
            self.live = False

    async def _follow_socket(self) -> bool:
        """One socket until it closes; True if it delivered a status message."""
        self._remaining, self._seq = None, 0
        self._dirty.clear()
        async with asyncio.timeout(self._timeout):
            ws = await self._session.ws_connect(
                self._url, heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES
            )
        self.connects += 1
        refresher = asyncio.create_task(self._refresh_loop(), name=f"queue-feed-{self._pid}")
        try:
            async with ws:
                log.debug("queue feed connected", extra={"fields": self._fields()})
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        remaining = queue_remaining(msg.data)
                        if remaining is not None:
                            self._remaining = remaining
                            self._seq += 1
                            self._dirty.set()
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        break
                    if refresher.done():
                        break  # it failed unexpectedly: start over on a new socket
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        return self._seq > 0

    async def _refresh_loop(self) -> None:
        """Turn each (coalesced) status change into running and pending figures."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            seq, remaining = self._seq, self._remaining
            if remaining == 0:
                self._apply(QueueDepth(running=0, pending=0))
                continue
            try:
                depth = await self._client.queue()
            except (aiohttp.ClientError, TimeoutError, ComfyApiError, KeyError, ValueError,
                    TypeError) as exc:
                self.live = False  # the probe's figures stand until a read works again
                log.debug("queue feed: /queue unreadable",
                          extra={"fields": {**self._fields(), "error": str(exc)}})
                continue
            if self._seq != seq and self._remaining == 0:
                continue  # the queue emptied while we read: that newer fact is applied next
            self._apply(depth)

    def _apply(self, depth: QueueDepth) -> None:
        if not self._alive():
            return  # never write a gone process's figures over its successor's
        self.live = True
        inst = self._inst
        if (inst.queue_running, inst.queue_pending) != (depth.running, depth.pending):
            inst.queue_running, inst.queue_pending = depth.running, depth.pending
            self._state.changed()

    def _fields(self) -> dict[str, Any]:
        return {"instance": self._inst.plan.name, "pid": self._pid}


def start_feed(
    state: MachineState,
    inst: InstanceState,
    pid: int,
    session: aiohttp.ClientSession,
    client: ComfyClient,
    timeout: float,
) -> tuple[QueueFeed, asyncio.Task[None]]:
    """A feed for ``pid`` and the task running it (cancel it with :func:`stop_feed`)."""
    feed = QueueFeed(state, inst, pid, session, client, timeout)
    task = asyncio.create_task(feed.run(), name=f"queue-feed-{inst.plan.name}")
    return feed, task


async def stop_feed(task: asyncio.Task[None] | None) -> None:
    """Cancel a feed's task and wait until its socket is closed."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

