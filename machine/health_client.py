"""Client of a running node's health server, for `status` and `wait-ready`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import aiohttp

from config.errors import HealthClientError

# Per request: the server holds ?wait= requests at most this long, then we ask again.
WAIT_CHUNK_S = 30.0
RETRY_S = 0.25


async def get_health(
    base_url: str,
    path: str,
    wait: float = 0.0,
    headers: dict[str, str] | None = None,
    since: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """GET ``path`` (with ?wait= if > 0, and ?since= the ``progress_token`` of an earlier answer:
    the server then also answers on a change); status and JSON body, or HealthClientError."""
    query = {"wait": f"{wait:.3f}"} if wait > 0 else {}
    if since is not None:
        query["since"] = since
    # No params: a query already in ``path`` stays as it is.
    return await _request("GET", base_url, path, query or None, headers, wait + 10.0)


async def post_health(
    base_url: str, path: str, headers: dict[str, str] | None = None, limit_s: float = 120.0
) -> tuple[int, dict[str, Any]]:
    """POST ``path`` (an operator action); status and JSON body, or HealthClientError."""
    return await _request("POST", base_url, path, None, headers, limit_s)


async def _request(
    method: str,
    base_url: str,
    path: str,
    params: dict[str, str] | None,
    headers: dict[str, str] | None,
    limit_s: float,
) -> tuple[int, dict[str, Any]]:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as session,
            session.request(
                method, base_url.rstrip("/") + path, params=params, headers=headers
            ) as resp,
        ):
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise HealthClientError(
            f"no answer from the health server at {base_url} ({type(exc).__name__}: {exc}); "
            "is `comfy-machine up` running, and is MACHINE_HEALTH_PORT right?"
        ) from None


class Outcome(StrEnum):
    READY = "ready"
    FINAL = "final"  # cannot become ready without someone acting (the body's final_reason)
    TIMEOUT = "timeout"
    REFUSED = "refused"  # 400/404: no such GPU, a malformed request


async def wait_ready(
    base_url: str,
    path: str,
    seconds: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Outcome, dict[str, Any]]:
    """Hold ?wait= requests until ``path`` is ``ready``, ``final``, or ``seconds`` pass;
    (outcome, last body). ``on_progress`` gets the first answer and each changed one (the
    server answers a ?since= request as soon as the answer's ``progress_token`` moves on).

    An agent that is not up yet (connection refused) is retried until the deadline."""
    deadline = time.monotonic() + seconds
    body: dict[str, Any] = {"reasons": ["the health server never answered"]}
    since = ""  # no answer has this progress token: the first request answers at once
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Outcome.TIMEOUT, body
        asked = time.monotonic()
        try:
            status, body = await get_health(
                base_url, path, min(remaining, WAIT_CHUNK_S), since=since
            )
        except HealthClientError as exc:
            body = {"reasons": [str(exc)]}
            await asyncio.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
            continue
        if status == 200 and body.get("status") == "ready":
            return Outcome.READY, body
        if status in (400, 404):
            return Outcome.REFUSED, body
        if body.get("final"):
            return Outcome.FINAL, body
        token = body.get("progress_token")
        if token != since:
            since = token
            if on_progress is not None:
                on_progress(body)
        elif time.monotonic() - asked < RETRY_S:
            # Answered at once with nothing new (a stopping node): do not spin on it.
            await asyncio.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
