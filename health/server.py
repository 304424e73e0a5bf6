"""The health API: aiohttp routes answering from MachineState, never doing I/O in a request
(except the instance log route, which reads a bounded part of a log file in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from health import checks
from health.metrics import MachineCollector, Snapshot, process_collectors, registry_of
from machine.state import MachineState, Phase

MAX_WAIT_S = 600.0
# A fleet of workers reconnects at once after a restart: 128 pending connections overflow and
# clients wait out a 1 s SYN retransmit (seen as p99 = 1 s with 200 clients).
HEALTH_BACKLOG = 1024
STATE_KEY = web.AppKey("state", MachineState)
COLLECTOR_KEY = web.AppKey("collector", MachineCollector)
PROCESS_COLLECTORS_KEY = web.AppKey("process_collectors", list[Collector])
DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 1000
# Bounds on what one log request reads, whatever the line lengths: a tail reads at most
# MAX_TAIL_BYTES back from the end, a follow (?after=) at most MAX_FOLLOW_BYTES forward.
MAX_TAIL_BYTES = 1024 * 1024
MAX_FOLLOW_BYTES = 256 * 1024
READ_BLOCK = 64 * 1024

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


async def _metrics(request: web.Request) -> web.Response:
    # The families are built on the event loop, which owns the state: one consistent read, no
    # I/O. Encoding them costs several times more (bench/metrics_scrape.py), so it runs in a
    # thread with the agent's process metrics and health requests do not wait behind it.
    families = list(request.app[COLLECTOR_KEY].collect())
    registry = registry_of(Snapshot(families), *request.app[PROCESS_COLLECTORS_KEY])
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encoder, registry)
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


@dataclass(frozen=True)
class LogChunk:
    """Lines read from an instance's log, and where a follow-up read continues."""

    lines: list[str]
    offset: int  # end of what was read in the current file; pass back as ?after=
    inode: int | None  # identity of the current file; a new one means it was rotated
    truncated: bool  # the byte bound cut the read short


def _split(data: bytes) -> list[str]:
    return [line.rstrip("\r") for line in data.decode("utf-8", "replace").split("\n")]


def _tail_bytes(path: Path, lines: int, budget: int) -> tuple[list[str], int, int, bool]:
    """Up to the last ``lines`` complete lines of ``path`` reading at most ``budget`` bytes
    back from its end; (lines, file size, inode, whether the budget cut it)."""
    with path.open("rb") as f:
        inode = os.fstat(f.fileno()).st_ino  # of the file read, even if it is rotated meanwhile
        size = f.seek(0, os.SEEK_END)
        data = b""
        pos = size
        # lines + 1 newlines bound ``lines`` complete lines.
        while pos > 0 and data.count(b"\n") <= lines and size - pos < budget:
            step = min(READ_BLOCK, pos, budget - (size - pos))
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    found = _split(data.removesuffix(b"\n")) if data else []
    cut = pos > 0
    if cut:
        found = found[1:]  # the first line read is probably partial
    return found[-lines:], size, inode, cut and len(found) < lines


def read_log_tail(path: Path, lines: int) -> LogChunk:
    """The last ``lines`` lines of an instance's log; the rotated ``<log>.1`` fills in when
    the current file has fewer (supervisord just rotated it). Bounded by MAX_TAIL_BYTES."""
    try:
        found, size, inode, cut = _tail_bytes(path, lines, MAX_TAIL_BYTES)
    except FileNotFoundError:
        return LogChunk([], 0, None, False)
    backup = path.with_name(path.name + ".1")
    if len(found) < lines and not cut and backup.is_file():
        with contextlib.suppress(FileNotFoundError):
            older, _, _, cut = _tail_bytes(backup, lines - len(found), MAX_TAIL_BYTES)
            found = older + found
    return LogChunk(found, size, inode, cut)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_forward(path: Path, offset: int, inode: int | None) -> LogChunk:
    """Complete lines after ``offset`` (from 0 if ``path`` is another file than ``inode`` or
    shorter than ``offset``), at most MAX_FOLLOW_BYTES; ``truncated`` means more is there."""
    with path.open("rb") as f:
        current = os.fstat(f.fileno())
        if (inode is not None and current.st_ino != inode) or current.st_size < offset:
            offset = 0
        f.seek(offset)
        data = f.read(MAX_FOLLOW_BYTES)
    full = len(data) == MAX_FOLLOW_BYTES
    end = data.rfind(b"\n")
    # Keep a partial last line for the next read, unless one line fills the whole bound.
    if end >= 0:
        data = data[: end + 1]
    elif not full:
        data = b""
    lines = _split(data.removesuffix(b"\n")) if data else []
    return LogChunk(lines, offset + len(data), current.st_ino, full)


def read_log_after(path: Path, offset: int, inode: int | None) -> LogChunk:
    """Lines appended after ``offset`` of the file ``inode`` named in an earlier answer. If
    supervisord rotated the log since, the rest of the old file (now ``<log>.1``) comes first,
    then the new file from its start."""
    backup = path.with_name(path.name + ".1")
    try:
        if inode is not None and _inode(path) != inode and _inode(backup) == inode:
            chunk = _read_forward(backup, offset, inode)
            if chunk.lines or chunk.truncated:
                return chunk
            offset, inode = 0, None  # the old file is finished: go on with the new one
        return _read_forward(path, offset, inode)
    except FileNotFoundError:
        return LogChunk([], 0, None, False)


def _int_param(request: web.Request, name: str, low: int, high: int, default: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"{name} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name}={raw!r}: expected an integer from {low} to {high}")
    return value


async def _instance_log(request: web.Request) -> web.Response:
    """The last ?tail=N lines of an instance's log (stdout and stderr, as supervisord keeps
    them), or with ?after=OFFSET&inode=INODE the lines appended since an earlier answer."""
    raw = request.match_info["gpu"]
    try:
        gpu = int(raw)
    except ValueError:
        return _error(400, f"gpu={raw!r} is not a GPU index; use an integer such as 0")
    state = request.app[STATE_KEY]
    inst = state.instances.get(gpu)
    if inst is None:
        known = sorted(state.instances)
        return _error(404, f"no instance for gpu {gpu}; known GPUs: {known}", known_gpus=known)
    path = inst.plan.log_path
    if "after" in request.query:
        after = _int_param(request, "after", 0, 2**63 - 1, None)
        inode = _int_param(request, "inode", 0, 2**63 - 1, 0) if "inode" in request.query else None
        chunk = await asyncio.to_thread(read_log_after, path, after, inode)
    else:
        tail = _int_param(request, "tail", 1, MAX_TAIL_LINES, DEFAULT_TAIL_LINES)
        chunk = await asyncio.to_thread(read_log_tail, path, tail)
    return _json(
        200,
        {
            "gpu": gpu,
            "name": inst.plan.name,
            "log_path": str(path),
            "exists": chunk.inode is not None,
            "lines": chunk.lines,
            "offset": chunk.offset,
            "inode": chunk.inode,
            "truncated": chunk.truncated,
        },
    )


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
    app[COLLECTOR_KEY] = MachineCollector(state)
    app[PROCESS_COLLECTORS_KEY] = process_collectors()
    app.router.add_get("/health/comfyui", _route(checks.node_report))
    app.router.add_get(
        "/health/comfyui/installation", _route(checks.installation_report)
    )
    app.router.add_get("/health/comfyui/instances", _route(checks.node_report))
    app.router.add_get("/health/comfyui/instances/{gpu}", _instance)
    app.router.add_get("/health/comfyui/instances/{gpu}/log", _instance_log)
    app.router.add_get("/health/comfyui/models", _route(checks.models_report))
    app.router.add_get("/livez", _route(checks.livez_report))
    app.router.add_get("/readyz", _route(checks.node_report))
    app.router.add_get("/metrics", _metrics)
    return app


async def start_health_server(state: MachineState, host: str, port: int) -> web.AppRunner:
    """Start serving; the caller cleans up with ``await runner.cleanup()``."""
    runner = web.AppRunner(
        create_app(state), handle_signals=False, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    site = web.TCPSite(
        runner, host, port, reuse_address=True, shutdown_timeout=2.0, backlog=HEALTH_BACKLOG
    )
    await site.start()
    return runner
