"""Client of a running node's health server, for `status` and `wait-ready`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from config.errors import HealthClientError

# Per request: the server holds ?wait= requests at most this long, then we ask again.
WAIT_CHUNK_S = 30.0
RETRY_S = 0.25


async def get_health(
    base_url: str, path: str, wait: float = 0.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """GET ``path`` (with ?wait= if > 0); status and JSON body, or HealthClientError."""
    params = {"wait": f"{wait:.3f}"} if wait > 0 else None
    timeout = aiohttp.ClientTimeout(total=wait + 10.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(base_url.rstrip("/") + path, params=params, headers=headers) as resp,
        ):
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise HealthClientError(
            f"no answer from the health server at {base_url} ({type(exc).__name__}: {exc}); "
            "is `comfy-machine up` running, and is MACHINE_HEALTH_PORT right?"
        ) from None


async def wait_ready(base_url: str, path: str, seconds: float) -> tuple[bool, dict[str, Any]]:
    """Hold ?wait= requests until ``path`` is ``ready`` or ``seconds`` pass; (ready, last body).

    An agent that is not up yet (connection refused) is retried until the deadline."""
    deadline = time.monotonic() + seconds
    body: dict[str, Any] = {"reasons": ["the health server never answered"]}
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, body
        try:
            status, body = await get_health(base_url, path, min(remaining, WAIT_CHUNK_S))
        except HealthClientError as exc:
            body = {"reasons": [str(exc)]}
            await asyncio.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
            continue
        if status == 200 and body.get("status") == "ready":
            return True, body
        if status in (400, 404):
            return False, body
