"""The health API: aiohttp routes answering from MachineState, never doing I/O in a request
(except the instance log route, which reads a bounded part of a log file in a thread)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.errors import LogFileRefused
from health import checks
from health.limits import FAST_ANSWER_KEY, HealthLimits, HealthRunner, http_answer, http_date
from services.logfile import lines_after, tail_lines
from services.operator import OperatorActions
from services.state import MachineState, Phase

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MAX_WAIT_S = 600.0
# A fleet of workers reconnects at once after a restart: 128 pending connections overflow and
# clients wait out a 1 s SYN retransmit (seen as p99 = 1 s with 200 clients).
HEALTH_BACKLOG = 1024
STATE_KEY = web.AppKey("state", MachineState)
METRICS_KEY = web.AppKey("metrics", "LazyMetrics")
# MACHINE_HEALTH_TOKEN as bytes; None: the log route is closed.
ANSWERS_KEY = web.AppKey("answers", "AnswerCache")
LOG_TOKEN_KEY = web.AppKey("log_token", bytes | None)  # type: ignore[arg-type]
# The operator actions (restart, drain, undrain, retest); None: the routes answer 409.
ACTIONS_KEY = web.AppKey("actions", OperatorActions | None)  # type: ignore[arg-type]
DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 1000

ReportFn = Callable[[MachineState, float], checks.Report]
# How long a cached answer serves without a state change (AnswerCache).
ANSWER_TTL_S = 0.5
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"}


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


class Answer:
    """One report, built once and serialized once: what waiters compare and the bytes sent."""

    __slots__ = ("_wire", "_wire_date", "built", "code", "final", "payload", "ready", "token",
                 "version")

    def __init__(self, code: int, body: dict[str, Any], version: int, built: float) -> None:
        self.code, self.version, self.built = code, version, built
        self.ready = code == 200 and body["status"] == "ready"
        self.final = bool(body.get("final"))
        self.token: str = body["progress_token"]
        self.payload = json.dumps(body).encode()
        self._wire, self._wire_date = b"", ""

    def wire(self) -> bytes:
        """The whole HTTP answer (status line, headers, body), rebuilt when its Date changes."""
        date = http_date()
        if date is not self._wire_date:  # the same str object for a whole second
            self._wire, self._wire_date = http_answer(self.code, self.payload), date
        return self._wire


class AnswerCache:
    """Answers by route (and GPU), built when the state changed (MachineState.version) or the
    answer is older than ANSWER_TTL_S, whichever comes first; every other request is served
    the same bytes. The TTL bounds the fields that move with the clock alone (``uptime_s``,
    ``eta_s``, download rates, "up 12s", "next start in 40 s") and the few writes that are
    batched before a ``changed()`` (download progress); every change that makes an answer
    different (a crash, a smoke result, a phase) calls ``changed()`` and shows at once."""

    def __init__(self, state: MachineState) -> None:
        self._state = state
        self._answers: dict[object, Answer] = {}

    def get(self, key: object, report: ReportFn) -> Answer:
        state, now = self._state, time.monotonic()
        answer = self._answers.get(key)
        if answer is None or answer.version != state.version or now - answer.built > ANSWER_TTL_S:
            code, body = report(state, time.time())
            body.setdefault("progress_token", checks.progress_token(body))
            answer = self._answers[key] = Answer(code, body, state.version, now)
        return answer


def _send(answer: Answer) -> web.Response:
    return web.Response(body=answer.payload, status=answer.code, headers=JSON_HEADERS)


async def _answer(request: web.Request, report: ReportFn, key: object = None) -> web.Response:
    """Answer now, or with ?wait= hold the request until the status is ``ready``, the answer
    is ``final`` (it cannot become ready without someone acting: checks.final_reason), its
    ``progress_token`` differs from ?since= (a waiter showing each change), or the wait ends. A
    degraded node answers 200 but is not ready: a waiter keeps waiting. A waiter costs nothing
    while it waits: it sleeps on the state's change event and, when woken, reads the answer
    the first of them built."""
    cache = request.app[ANSWERS_KEY]
    key = report if key is None else key
    if not request.query_string:  # the common case: a probe, answered from the cache
        return _send(cache.get(key, report))
    state = request.app[STATE_KEY]
    deadline = time.monotonic() + _parse_wait(request)
    since = request.query.get("since")
    while True:
        answer = cache.get(key, report)
        remaining = deadline - time.monotonic()
        # A stopping (or draining) node will not become ready: release held requests so
        # shutdown is prompt.
        moved = since is not None and answer.token != since
        stopping = state.phase is Phase.STOPPING or state.draining
        if answer.ready or answer.final or moved or remaining <= 0 or stopping:
            return _send(answer)
        await state.wait_changed(remaining)


def _route(report: ReportFn) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return await _answer(request, report)

    return handler


# The answers served from the cache, by path; also the paths a plain GET of which the health
# protocol answers itself (health/limits.py), with the same bytes.
CACHED_ROUTES: dict[str, ReportFn] = {
    "/health/comfyui": checks.node_report,
    "/health/comfyui/installation": checks.installation_report,
    "/health/comfyui/instances": checks.node_report,
    "/health/comfyui/models": checks.models_report,
    "/livez": checks.livez_report,
    "/readyz": checks.readyz_report,
}
INSTANCE_PATH = "/health/comfyui/instances/"


def _instance_report(gpu: int) -> ReportFn:
    def report(st: MachineState, now: float) -> checks.Report:
        found = checks.instance_report(st, gpu, now)
        assert found is not None  # instances never disappear from a running node
        return found

    return report


def _fast_answer(state: MachineState, cache: AnswerCache) -> Callable[[str], bytes | None]:
    """The health protocol's shortcut: the answer to a plain GET of ``path`` as bytes, from
    the same cache and keys as the routes; None for every other path."""
    routes: dict[str, tuple[object, ReportFn]] = {
        path: (report, report) for path, report in CACHED_ROUTES.items()
    }

    def answer(path: str) -> bytes | None:
        route = routes.get(path)
        if route is None:
            if not path.startswith(INSTANCE_PATH):
                return None
            gpu = path[len(INSTANCE_PATH):]
            # Only the canonical spelling of a known GPU ("0", never "00" or "+0").
            if not gpu.isdigit() or str(int(gpu)) != gpu or int(gpu) not in state.instances:
                return None
            route = routes[path] = (("instance", int(gpu)), _instance_report(int(gpu)))
        return cache.get(*route).wire()

    return answer


def _instance_gpu(request: web.Request) -> int | web.Response:
    """The {gpu} of the path if the node has it; else the JSON 400 or 404 to answer."""
    raw = request.match_info["gpu"]
    try:
        gpu = int(raw)
    except ValueError:
        return _error(400, f"gpu={raw!r} is not a GPU index; use an integer such as 0")
    instances = request.app[STATE_KEY].instances
    if gpu not in instances:
        known = sorted(instances)
        return _error(404, f"no instance for gpu {gpu}; known GPUs: {known}", known_gpus=known)
    return gpu


async def _instance(request: web.Request) -> web.Response:
    gpu = _instance_gpu(request)
    if isinstance(gpu, web.Response):
        return gpu
    return await _answer(request, _instance_report(gpu), ("instance", gpu))


class LazyMetrics:
    """The /metrics collectors, built at the first scrape: prometheus_client (~40 ms to load
    here) stays off the path of a warm boot, which does not need it to serve."""

    __slots__ = ("_built", "_state")

    def __init__(self, state: MachineState) -> None:
        self._state = state
        self._built: tuple[Collector, list[Collector]] | None = None

    def collectors(self) -> tuple[Collector, list[Collector]]:
        """The node's collector and the agent's process collectors."""
        if self._built is None:
            from health.metrics import MachineCollector, process_collectors

            self._built = (MachineCollector(self._state), process_collectors())
        return self._built


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client.exposition import choose_encoder

    from health.metrics import Snapshot, registry_of

    # The families are built on the event loop, which owns the state: one consistent read, no
    # I/O. Encoding them costs several times more (bench/metrics_scrape.py), so it runs in a
    # thread with the agent's process metrics and health requests do not wait behind it.
    machine, process = request.app[METRICS_KEY].collectors()
    families = list(machine.collect())
    registry = registry_of(Snapshot(families), *process)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encoder, registry)
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


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


def _log_access(
    request: web.Request, what: str = "instance logs", served: str = "served"
) -> web.Response | None:
    """None when the request carries MACHINE_HEALTH_TOKEN; else the JSON 401 or 403 to answer.

    Logs can hold prompts, paths and custom-node output, and operator actions change what runs:
    both are only for holders of MACHINE_HEALTH_TOKEN, while every other health route stays
    open to probes."""
    token = request.app[LOG_TOKEN_KEY]
    if token is None:
        return _error(403, f"{what} are not {served}: no MACHINE_HEALTH_TOKEN is set on this "
                      "node; set it and send 'Authorization: Bearer <token>'")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), token
    ):
        resp = _error(401, f"{what} need 'Authorization: Bearer <MACHINE_HEALTH_TOKEN>'; "
                      "the token is missing or wrong")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="comfy-machine logs"'
        return resp
    return None


def _operator_action(action: str) -> Callable[[web.Request], Any]:
    """POST .../{gpu}/<action>: token-guarded (as the log route), logged with the client's
    address (never the token), answered by services/operator.py in JSON."""

    async def handler(request: web.Request) -> web.Response:
        fields: dict[str, Any] = {"action": action, "gpu": request.match_info["gpu"],
                                  "client": request.remote}
        denied = _log_access(request, "operator actions", "allowed")
        if denied is not None:
            log.warning("operator action refused", extra={"fields": {
                **fields, "status": denied.status}})
            return denied
        gpu = _instance_gpu(request)
        if isinstance(gpu, web.Response):
            return gpu
        actions = request.app[ACTIONS_KEY]
        if actions is None:
            return _error(409, f"{action}: this health server has no node to act on")
        code, body = await getattr(actions, action)(gpu)
        log.info("operator action", extra={"fields": {
            **fields, "status": code, "ok": body.get("ok"), "message": body.get("message")}})
        return _json(code, body)

    return handler


async def _instance_log(request: web.Request) -> web.Response:
    """The last ?tail=N lines of an instance's log (stdout and stderr, as supervisord keeps
    them), or with ?after=OFFSET&inode=INODE the lines appended since an earlier answer."""
    denied = _log_access(request)
    if denied is not None:
        return denied
    gpu = _instance_gpu(request)
    if isinstance(gpu, web.Response):
        return gpu
    inst = request.app[STATE_KEY].instances[gpu]
    path = inst.plan.log_path
    try:
        if "after" in request.query:
            after = _int_param(request, "after", 0, 2**63 - 1, None)
            inode = (
                _int_param(request, "inode", 0, 2**63 - 1, 0) if "inode" in request.query else None
            )
            chunk = await asyncio.to_thread(lines_after, path, after, inode)
        else:
            tail = _int_param(request, "tail", 1, MAX_TAIL_LINES, DEFAULT_TAIL_LINES)
            chunk = await asyncio.to_thread(tail_lines, path, tail)
    except LogFileRefused as exc:
        return _error(403, str(exc))
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


def create_app(
    state: MachineState, log_token: str | None = None, actions: OperatorActions | None = None
) -> web.Application:
    """The aiohttp application serving the health API from ``state``; the log route and the
    operator actions answer only requests carrying ``log_token`` (none: they answer 403)."""
    app = web.Application(middlewares=[_json_errors])
    app[STATE_KEY] = state
    app[ANSWERS_KEY] = AnswerCache(state)
    app[FAST_ANSWER_KEY] = _fast_answer(state, app[ANSWERS_KEY])
    app[LOG_TOKEN_KEY] = log_token.encode() if log_token else None
    app[ACTIONS_KEY] = actions
    app[METRICS_KEY] = LazyMetrics(state)
    for path, report in CACHED_ROUTES.items():
        app.router.add_get(path, _route(report))
    app.router.add_get("/health/comfyui/instances/{gpu}", _instance)
    app.router.add_get("/health/comfyui/instances/{gpu}/log", _instance_log)
    for action in ("restart", "drain", "undrain"):
        app.router.add_post(f"/health/comfyui/instances/{{gpu}}/{action}", _operator_action(action))
    app.router.add_post("/health/comfyui/gpus/{gpu}/retest", _operator_action("retest"))
    app.router.add_get("/metrics", _metrics)
    return app


async def start_health_server(
    state: MachineState,
    host: str,
    port: int,
    limits: HealthLimits | None = None,
    log_token: str | None = None,
    actions: OperatorActions | None = None,
) -> HealthRunner:
    """Start serving under ``limits`` (timeouts, connection cap, head bounds: health/limits.py);
    the caller cleans up with ``await runner.cleanup()``."""
    runner = HealthRunner(
        create_app(state, log_token, actions), limits or HealthLimits(), shutdown_timeout=2.0
    )
    await runner.setup()
    # The shutdown timeout is the runner's (aiohttp deprecates it on the site).
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=HEALTH_BACKLOG)
    await site.start()
    return runner
