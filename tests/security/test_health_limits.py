"""Issue 17, point 3: the health server survives abuse. Real sockets against the real aiohttp
app as `up` starts it (start_health_server), with shortened timeouts: half-sent and silent
connections closed within the head timeout, idle keep-alive after the idle timeout, a cap on
open connections past which new ones are refused at once (and the port answers again by
itself once the timeouts clear a flood), and oversized heads answered 414/431/400 as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from health.limits import LINGER_S, GuardedServer, HealthLimits
from health.server import CACHED_ROUTES, start_health_server
from services.fdlimit import FD_RESERVE, FdBudget
from services.state import MachineState, Phase
from tests.security.wire import Answer, Conn, parse
from tests.unit.test_checks import instance, make_ready, node

Serve = Callable[..., Awaitable[tuple[int, GuardedServer]]]
HALF_SENT = b"GET /health/comfyui HTTP/1.1\r\nHost: localhost\r\n"  # no blank line: never ends


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start the product's health server on an ephemeral loopback port; (port, server)."""
    runners = []

    async def start(
        limits: HealthLimits, state: MachineState | None = None
    ) -> tuple[int, GuardedServer]:
        state = state or node(make_ready(instance(0)))
        runner = await start_health_server(state, "127.0.0.1", 0, limits)
        runners.append(runner)
        return runner.addresses[0][1], runner.guarded

    yield start
    for runner in runners:
        await runner.cleanup()


async def closing(conns: list[Conn]) -> None:
    await asyncio.gather(*(c.close() for c in conns))


async def all_released(server: GuardedServer) -> None:
    """Every connection's descriptor is given back (a 408 lingers up to LINGER_S for the
    client's FIN)."""
    for _ in range(int((LINGER_S + 2) / 0.02)):
        if not server.open_connections:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{server.open_connections} connections still open")


async def get_status(port: int, path: str = "/health/comfyui") -> int | None:
    """A well-behaved client's GET (a fresh connection each time); None if refused or reset."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as resp,
        ):
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_silent_half_sent_and_trickling_connections_close_within_the_head_timeout(
    serve: Serve,
) -> None:
    port, server = await serve(HealthLimits(header_timeout=0.5, idle_timeout=30))
    silent, half, trickle = [await Conn.open(port) for _ in range(3)]
    half.send(HALF_SENT)

    async def trickle_bytes() -> None:  # a byte every 50 ms never completes a head
        with contextlib.suppress(ConnectionError):
            for byte in HALF_SENT * 10:
                trickle.send(bytes([byte]))
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle_bytes())
    try:
        results = await asyncio.gather(*(c.until_closed(5) for c in (silent, half, trickle)))
    finally:
        sender.cancel()
        await closing([silent, half, trickle])
    for elapsed, raw in results:
        assert 0.4 < elapsed < 2.0, elapsed  # the head timeout, not the 30 s idle timeout
        answer = parse(raw)
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert "not complete within 0.5 s" in answer.json()["error"]
    await all_released(server)


async def test_idle_keep_alive_closes_after_the_idle_timeout_not_the_head_timeout(
    serve: Serve,
) -> None:
    port, server = await serve(HealthLimits(header_timeout=0.3, idle_timeout=1.5))
    conn = await Conn.open(port)
    try:
        answer = await conn.request("/livez")
        assert answer.status == 200 and answer.json()["status"] == "ready"
        answered = time.monotonic()
        # Idle longer than the head timeout: a keep-alive client may still send its next one.
        assert await conn.is_open_after(0.6)
        assert (await conn.request("/health/comfyui")).status == 200
        answered = time.monotonic()
        _, raw = await conn.until_closed(5)
        idle = time.monotonic() - answered
        assert raw == b"" and 1.3 < idle < 3.0, idle  # closed quietly, by the idle timeout
        assert server.fast_answered == 2  # answered by the protocol: its keep-alive timer too
    finally:
        await conn.close()
    await all_released(server)


async def test_a_held_wait_request_is_not_cut_by_the_head_timeout(serve: Serve) -> None:
    """Pipelined: a ?wait= request being held is answered in full even when the client has
    started its next head meanwhile (the head timeout never writes into another answer)."""
    limits = HealthLimits(header_timeout=0.3, idle_timeout=1.0)
    port, _ = await serve(limits, node(instance(0), phase=Phase.STARTING))
    conn = await Conn.open(port)
    try:
        conn.send(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /health/comfyui?wait=1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.1)
        conn.send(HALF_SENT)  # the third head starts while the second is held
        _, raw = await conn.until_closed(5)
    finally:
        await conn.close()
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 503" in rest and b'"status": "starting"' in rest
    assert b"408" not in rest  # closed quietly by the idle timeout afterwards


@pytest.mark.parametrize("kind", ["silent", "half-sent", "idle keep-alive"])
async def test_a_flood_past_the_cap_is_refused_at_once_and_the_port_recovers(
    serve: Serve, kind: str
) -> None:
    cap, flood = 50, 200
    limits = HealthLimits(header_timeout=1.0, idle_timeout=1.5, max_connections=cap)
    port, server = await serve(limits)
    assert await get_status(port) == 200
    started = time.monotonic()
    conns = [await Conn.open(port) for _ in range(flood)]
    try:
        if kind == "half-sent":
            for c in conns:
                c.send(HALF_SENT)
        # Past the cap: a JSON 503 and the connection closed at once (no timeout waited for).
        for elapsed, raw in await asyncio.gather(*(c.until_closed(2) for c in conns[cap:])):
            assert elapsed < 1.0  # not the 1 s head timeout
            answer = parse(raw)
            assert answer.status == 503 and answer.headers["retry-after"] == "1"
            assert f"maximum of {cap} connections" in answer.json()["error"]
        assert server.open_connections == cap and server.refused_total == flood - cap
        held = conns[:cap]
        if kind == "idle keep-alive":
            for answer in await asyncio.gather(*(c.request("/livez") for c in held)):
                assert answer.status == 200
        # While the cap is reached a well-behaved client is turned away, never left hanging.
        assert await get_status(port) in (503, None)
        # The timeouts clear the flood: the port answers again by itself.
        while (status := await get_status(port)) != 200:
            assert time.monotonic() - started < 10, f"still {status} after the flood"
            await asyncio.sleep(0.1)
        recovered = time.monotonic() - started
        bound = limits.header_timeout if kind != "idle keep-alive" else limits.idle_timeout
        assert recovered < bound + 3.0, recovered
        for elapsed, _raw in await asyncio.gather(*(c.until_closed(5) for c in held)):
            assert elapsed < bound + 3.0
    finally:
        await closing(conns)
    await all_released(server)


def request_with(line: str = "/health/comfyui", headers: int = 1, size: int = 10) -> bytes:
    fields = "".join(f"X-Filler-{i}: {'v' * size}\r\n" for i in range(headers))
    return f"GET {line} HTTP/1.1\r\nHost: localhost\r\n{fields}\r\n".encode()


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        (request_with("/" + "a" * 5000), 414, "request line longer than 4096 bytes"),
        (request_with(size=9000), 431, "header line longer than 8190 bytes"),
        (request_with(headers=100), 431, "more than 64 header lines"),
        (request_with(headers=40, size=1000), 431, "request head larger than 32768 bytes"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n", 400, "malformed"),
        (b"GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "malformed"),
        (b"GARBAGE\r\n\r\n", 400, "malformed"),
    ],
    ids=["long-line", "long-header", "many-headers", "big-head", "tls", "two-hosts", "garbage"],
)
async def test_oversized_or_malformed_heads_are_answered_as_json(
    serve: Serve, raw: bytes, status: int, says: str
) -> None:
    port, _ = await serve(HealthLimits(header_timeout=2))
    conn = await Conn.open(port)
    try:
        conn.send(raw)
        elapsed, data = await conn.until_closed(5)
    finally:
        await conn.close()
    answer = parse(data)
    assert answer.status == status and elapsed < 1.0
    body = answer.json()
    assert body["status"] == "error" and says in body["error"]


async def test_a_big_head_is_refused_even_when_it_trickles(serve: Serve) -> None:
    port, _ = await serve(HealthLimits(header_timeout=5))
    conn = await Conn.open(port)
    try:
        with contextlib.suppress(ConnectionError):
            for line in request_with(headers=60, size=1000).split(b"\r\n"):
                conn.send(line + b"\r\n")
                await asyncio.sleep(0)
        _, data = await conn.until_closed(5)
    finally:
        await conn.close()
    assert parse(data).status == 431


async def test_route_errors_stay_json_under_the_guarded_server(serve: Serve) -> None:
    port, _ = await serve(HealthLimits())
    conn = await Conn.open(port)
    try:
        for path, status in (("/no/such/route", 404), ("/health/comfyui?wait=x", 400)):
            answer = await conn.request(path)
            assert answer.status == status and answer.json()["status"] == "error"
        assert (await conn.request("/livez")).status == 200  # and the connection is kept
    finally:
        await conn.close()


def test_the_connection_cap_stays_below_the_fd_limit_minus_the_reserve() -> None:
    assert FdBudget(soft=1_048_576, hard=1_048_576).connection_cap(10_000) == 10_000
    assert FdBudget(soft=4096, hard=4096).connection_cap(10_000) == 4096 - FD_RESERVE
    assert FdBudget(soft=1024, hard=4096).connection_cap(10_000) == 1024 - FD_RESERVE
    tiny = FdBudget(soft=100, hard=100)
    assert tiny.reserve == 50 and tiny.connection_cap(10_000) == 50


def test_the_agent_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import resource; from services.fdlimit import raise_fd_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "budget = raise_fd_limit()\n"
        "print(budget.soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    budget_soft, soft = map(int, out.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else budget_soft
    assert soft == budget_soft == expected and soft > 256


# The answers the health protocol sends itself (plain keep-alive GETs of the cached routes).
CACHED_PATHS = [*CACHED_ROUTES, "/health/comfyui/instances/0"]


async def read_answer(conn: Conn) -> Answer:
    async with asyncio.timeout(10):
        answer = parse(await conn.reader.readuntil(b"\r\n\r\n"))
        answer.body = await conn.reader.readexactly(int(answer.headers["content-length"]))
    return answer


@pytest.mark.parametrize("path", CACHED_PATHS)
async def test_a_plain_get_is_answered_by_the_protocol_with_the_apps_answer(
    serve: Serve, path: str
) -> None:
    port, server = await serve(HealthLimits())
    conn = await Conn.open(port)
    try:
        fast = await conn.request(path)
        assert server.fast_answered == 1
        # ?wait=0 changes nothing in the answer but takes the app's route.
        routed = await conn.request(path + ("&" if "?" in path else "?") + "wait=0")
        assert server.fast_answered == 1
    finally:
        await conn.close()
    assert (fast.status, fast.body) == (routed.status, routed.body)
    assert fast.json()["status"] in ("ready", "alive")
    without_date = [{k: v for k, v in a.headers.items() if k != "date"} for a in (fast, routed)]
    assert without_date[0] == without_date[1]
    assert fast.headers["date"].endswith(" GMT") and fast.headers["cache-control"] == "no-store"


async def test_pipelined_requests_are_answered_in_order_across_both_paths(serve: Serve) -> None:
    port, server = await serve(HealthLimits())
    conn = await Conn.open(port)
    paths = ["/readyz", "/health/comfyui?wait=0", "/livez", "/no/such/route", "/readyz"]
    try:
        conn.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        answers = [await read_answer(conn) for _ in paths]
        # Only the first: once a request waits for the app, what follows it waits its turn.
        assert server.fast_answered == 1
        one_by_one = [await conn.request(p) for p in paths]
    finally:
        await conn.close()
    assert [a.status for a in answers] == [200, 200, 200, 404, 200]
    assert [a.body for a in answers] == [a.body for a in one_by_one]


@pytest.mark.parametrize(
    ("raw", "status", "closes"),
    [
        (b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 200, False),
        (b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, False),
        (b"GET /readyz HTTP/1.0\r\n\r\n", 200, True),
        (b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200, True),
        (b"GET /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 200, False),
        (b"GET /health/comfyui/instances/7 HTTP/1.1\r\nHost: x\r\n\r\n", 404, False),
        (b"GET /health/comfyui/instances/00 HTTP/1.1\r\nHost: x\r\n\r\n", 200, False),
        (b"GET /readyz/ HTTP/1.1\r\nHost: x\r\n\r\n", 404, False),
    ],
    ids=["head", "post", "http1.0", "connection-close", "body", "unknown-gpu", "gpu-00",
         "slash"],
)
async def test_what_the_protocol_does_not_answer_goes_to_the_app(
    serve: Serve, raw: bytes, status: int, closes: bool
) -> None:
    port, server = await serve(HealthLimits())
    conn = await Conn.open(port)
    try:
        conn.send(raw)
        async with asyncio.timeout(10):
            answer = parse(await conn.reader.readuntil(b"\r\n\r\n"))
            if not raw.startswith(b"HEAD"):
                answer.body = await conn.reader.readexactly(int(answer.headers["content-length"]))
        assert answer.status == status
        assert closes != await conn.is_open_after(0.05)
    finally:
        await conn.close()
    assert server.fast_answered == 0


async def test_a_state_change_shows_in_the_next_protocol_answer(serve: Serve) -> None:
    state = node(make_ready(instance(0)))
    port, server = await serve(HealthLimits(), state)
    conn = await Conn.open(port)
    try:
        assert (await conn.request("/readyz")).json()["status"] == "ready"
        state.draining = True
        state.changed()
        after = await conn.request("/readyz")
    finally:
        await conn.close()
    assert after.status == 503 and after.json()["status"] != "ready"
    assert server.fast_answered == 2
