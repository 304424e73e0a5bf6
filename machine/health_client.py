"""Client of a running node's health server, for `status`, `wait-ready`, `logs` and the
operator actions.

On the standard library (http.client), not aiohttp: these commands are short processes whose
whole run is mostly Python starting up, and aiohttp alone takes longer to import than the
150 ms they should answer in (issue 14). One request at a time is all they need."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode, urlsplit

from config.errors import HealthClientError

# Per request: the server holds ?wait= requests at most this long, then we ask again.
WAIT_CHUNK_S = 30.0
RETRY_S = 0.25
# What a request may take beyond the ?wait= the server holds it for.
ANSWER_S = 10.0
READ_CHUNK = 64 * 1024
# The userinfo of a URL (http://user:secret@host): never repeated in a message.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _shown(url: str) -> str:
    return _USERINFO.sub("***@", url)


def request(
    method: str,
    base_url: str,
    path: str,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    limit_s: float = ANSWER_S,
) -> tuple[int, bytes]:
    """``method`` ``base_url`` + ``path`` (``query`` added to any query ``path`` has), within
    ``limit_s`` seconds in all; the status and the body. Raises HealthClientError naming the
    URL (never a header: the token is in one) when there is no whole answer in time."""
    url = base_url.rstrip("/") + path
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http:// or https:// URL")
        target = parts.path or "/"
        params = "&".join(p for p in (parts.query, urlencode(query or {})) if p)
        if params:
            target += "?" + params
        connection = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        return _exchange(connection(parts.hostname, parts.port, timeout=limit_s),
                         method, target, headers or {}, time.monotonic() + limit_s)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # TimeoutError says only "timed out": say after how long.
        detail = f"no whole answer within {limit_s:g}s" if isinstance(exc, TimeoutError) else exc
        raise HealthClientError(
            f"no answer from the health server at {_shown(base_url)} "
            f"({type(exc).__name__}: {_shown(str(detail))}); is `comfy-machine up` running, and "
            "is MACHINE_HEALTH_PORT (or --url) right?"
        ) from None


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    headers: dict[str, str],
    deadline: float,
) -> tuple[int, bytes]:
    # The socket timeout bounds each connect/recv; setting it to what is left of the deadline
    # before each step makes ``limit_s`` bound the whole exchange, as aiohttp's total timeout did.
    try:
        conn.request(method, target, headers=headers)
        sock = conn.sock  # getresponse() drops it from conn when the answer closes the connection
        _time_left(sock, deadline)
        resp = conn.getresponse()
        body = bytearray()
        while True:
            _time_left(sock, deadline)
            # read1: what has arrived, at most one recv; read(n) would wait for all n bytes.
            chunk = resp.read1(READ_CHUNK)
            if not chunk:
                return resp.status, bytes(body)
            body += chunk
    finally:
        conn.close()


def _time_left(sock: Any, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    if sock is not None:
        sock.settimeout(left)


def _json_request(
    method: str,
    base_url: str,
    path: str,
    query: dict[str, str] | None,
    headers: dict[str, str] | None,
    limit_s: float,
) -> tuple[int, dict[str, Any]]:
    status, raw = request(method, base_url, path, query, headers, limit_s)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise HealthClientError(
            f"{_shown(base_url)} answered {path.split('?')[0]} with HTTP {status} and no JSON "
            "object: is that comfy-machine's health server? Check MACHINE_HEALTH_PORT (or --url)"
        )
    return status, body


def get_health(
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
    return _json_request("GET", base_url, path, query, headers, wait + ANSWER_S)


def post_health(
    base_url: str, path: str, headers: dict[str, str] | None = None, limit_s: float = 120.0
) -> tuple[int, dict[str, Any]]:
    """POST ``path`` (an operator action); status and JSON body, or HealthClientError."""
    return _json_request("POST", base_url, path, None, headers, limit_s)


class Outcome(StrEnum):
    READY = "ready"
    FINAL = "final"  # cannot become ready without someone acting (the body's final_reason)
    TIMEOUT = "timeout"
    REFUSED = "refused"  # 400/404: no such GPU, a malformed request


def wait_ready(
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
            status, body = get_health(base_url, path, min(remaining, WAIT_CHUNK_S), since=since)
        except HealthClientError as exc:
            body = {"reasons": [str(exc)]}
            time.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
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
            time.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
