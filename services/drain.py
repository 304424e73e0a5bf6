"""Drain before stop: after SIGTERM the node accepts no new work (health says ``draining``) and
waits until every live instance's running and queued prompts are done, bounded by
DRAIN_TIMEOUT; a second signal ends the wait at once. The instances are stopped afterwards by
the caller, as on any stop."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from services.comfyui import ComfyApiError, ComfyClient
from services.state import MachineState

log = logging.getLogger(__name__)

# How often each instance's /queue is read while draining: the stop follows the last prompt's
# end closely, and the queue figures in health stay current.
DRAIN_POLL_S = 0.1


def begin_drain(state: MachineState, timeout: float, now: float | None = None) -> None:
    """Stop accepting at once: every health answer says ``draining`` from here on."""
    now = time.time() if now is None else now
    state.draining = True
    state.drain_started_at = now
    state.drain_deadline = now + timeout
    state.changed()


async def drain(
    state: MachineState, limit_s: float, stop_now: asyncio.Event, probe_timeout: float = 5.0
) -> bool:
    """Wait until no live instance has a running or queued prompt (True), or ``limit_s`` ends
    or ``stop_now`` is set (False). Each instance's /queue is read directly (fresh figures,
    not the last periodic probe); an instance that died has nothing left to wait for."""
    begin_drain(state, limit_s)
    started = time.monotonic()
    log.info("draining: not accepting new work; waiting for running and queued prompts",
             extra={"fields": {"timeout_s": limit_s}})
    async with aiohttp.ClientSession() as session:
        clients = {
            gpu: ComfyClient(session, inst.plan.url, probe_timeout)
            for gpu, inst in state.instances.items()
        }
        last: list[list[str]] = [[]]

        async def until_idle() -> None:
            while busy := await _busy(state, clients):
                last[0] = busy
                await asyncio.sleep(DRAIN_POLL_S)

        idle = asyncio.ensure_future(until_idle())
        now = asyncio.ensure_future(stop_now.wait())
        try:
            await asyncio.wait({idle, now}, timeout=limit_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (idle, now):
                task.cancel()
            await asyncio.gather(idle, now, return_exceptions=True)
    elapsed = round(time.monotonic() - started, 3)
    if idle.done() and not idle.cancelled() and idle.exception() is None:
        log.info("drained", extra={"fields": {"duration_s": elapsed}})
        return True
    if stop_now.is_set():
        log.warning("drain cut short by a second signal",
                    extra={"fields": {"busy": last[0], "duration_s": elapsed}})
    else:
        log.warning("drain timed out; stopping instances with prompts left",
                    extra={"fields": {"busy": last[0], "timeout_s": limit_s}})
    return False


async def _busy(state: MachineState, clients: dict[int, ComfyClient]) -> list[str]:
    """Names of the live instances that still have work (or did not answer: unknown counts
    as busy, bounded by the drain's timeout)."""

    async def one(gpu: int) -> str | None:
        inst = state.instances[gpu]
        if not inst.process_alive:
            return None
        try:
            depth = await clients[gpu].queue()
        except (aiohttp.ClientError, TimeoutError, ComfyApiError, KeyError, ValueError):
            return inst.plan.name if inst.process_alive else None
        if (inst.queue_running, inst.queue_pending) != (depth.running, depth.pending):
            inst.queue_running, inst.queue_pending = depth.running, depth.pending
            state.changed()
        return inst.plan.name if depth.running or depth.pending else None

    found = await asyncio.gather(*(one(gpu) for gpu in clients))
    return [name for name in found if name is not None]
