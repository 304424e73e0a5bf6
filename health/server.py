"""The health API: aiohttp routes answering from MachineState, never doing I/O in a request."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from health import checks
from machine.state import MachineState, Phase

MAX_WAIT_S = 600.0
STATE_KEY = web.AppKey("state", MachineState)

ReportFn = Callable[[MachineState, float], checks.Report]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json(status, {"status": "error", "error": message, **extra})


def _parse_wait(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not (0.0 <= wait <= MAX_WAIT_S):  # also rejects nan and inf
        raise web.HTTPBadRequest(
            text=f"wait={raw!r}: expected seconds between 0 and {MAX_WAIT_S:.0f}",
        )
    return wait


async def _answer(request: web.Request, report: ReportFn) -> web.Response:
    """Answer now, or with ?wait= hold the request until the status is ``ready`` or the wait
    ends (a degraded node answers 200 but is not ready: a waiter keeps waiting)."""
    state = request.app[STATE_KEY]
    deadline = time.monotonic() + _parse_wait(request)
    while True:
        code, body = report(state, time.time())
        remaining = deadline - time.monotonic()
        # A stopping node will not become ready: release held requests so shutdown is prompt.
        ready = code == 200 and body["status"] == "ready"
        if ready or remaining <= 0 or state.phase is Phase.STOPPING:
            return _json(code, body)
        await state.wait_changed(remaining)


def _route(report: ReportFn) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return await _answer(request, report)

    return handler


async def _instance(request: web.Request) -> web.Response:
    raw = request.match_info["gpu"]
    try:
        gpu = int(raw)
    except ValueError:
        return _error(400, f"gpu={raw!r} is not a GPU index; use an integer such as 0")
    state = request.app[STATE_KEY]
    if gpu not in state.instances:
        known = sorted(state.instances)
        return _error(404, f"no instance for gpu {gpu}; known GPUs: {known}", known_gpus=known)

    def report(st: MachineState, now: float) -> checks.Report:
        found = checks.instance_report(st, gpu, now)
        assert found is not None  # instances never disappear from a running node
        return found

    return await _answer(request, report)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    # Clients (workers, probes) parse every answer as JSON: never send an HTML error page.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return _error(exc.status, message, path=request.path)


def create_app(state: MachineState) -> web.Application:
    """The aiohttp application serving the health API from ``state``."""
    app = web.Application(middlewares=[_json_errors])
    app[STATE_KEY] = state
    app.router.add_get("/health/comfyui", _route(checks.node_report))
    app.router.add_get(
        "/health/comfyui/installation", _route(lambda s, _now: checks.installation_report(s))
    )
    app.router.add_get("/health/comfyui/instances", _route(checks.node_report))
    app.router.add_get("/health/comfyui/instances/{gpu}", _instance)
    app.router.add_get("/health/comfyui/models", _route(lambda s, _now: checks.models_report(s)))
    app.router.add_get("/livez", _route(lambda s, _now: checks.livez_report(s)))
    app.router.add_get("/readyz", _route(checks.node_report))
    return app


async def start_health_server(state: MachineState, host: str, port: int) -> web.AppRunner:
    """Start serving; the caller cleans up with ``await runner.cleanup()``."""
    runner = web.AppRunner(
        create_app(state), handle_signals=False, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, shutdown_timeout=2.0)
    await site.start()
    return runner
