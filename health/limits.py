"""Limits that keep the health port from hurting the node under abuse (issue 17).

Seen in production: ~20,000 idle or half-sent connections were never closed; the agent ran
out of file descriptors, supervisord XML-RPC failed with EMFILE and a healthy instance was
stopped. aiohttp alone offers a keep-alive timeout and parser bounds, but no timeout on a
request head, no cap on connections, and plain-text 400s from its parser. So the health
server runs its own protocol on top of aiohttp's:

- a request head (line and headers) must arrive complete within ``header_timeout`` of the
  connection being accepted or of its first byte (a slow sender is answered 408 and closed);
- an idle keep-alive connection is closed after ``idle_timeout`` (aiohttp's keepalive_timeout);
- past ``max_connections`` open connections a new one is answered 503 and closed at once, so
  the agent keeps its descriptors and, once the timeouts clear a flood, answers by itself;
- the request line, each header line, the header count and the whole head are bounded
  (414, 431), and every error, the parser's included, is answered as JSON.

Workers and probes poll a handful of answers all day, and aiohttp's per-request objects
(request, task, response, headers) cost several times what those answers do. So a plain
keep-alive ``GET`` of a path the app registers under FAST_ANSWER_KEY (no query, no body, HTTP/1.1)
is answered by the protocol itself with the prepared bytes, straight after aiohttp's own parser
has read it (strictness, bounds and errors stay aiohttp's); every other request takes the app's
route as before. Answers leave in request order: a request is answered here only when nothing
before it on the connection is still with the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)

REFUSED_LOG_INTERVAL_S = 10.0
# After a 408/431 of ours: how long the client's further bytes are read and dropped before
# the connection is closed anyway.
LINGER_S = 1.0


@dataclass(frozen=True)
class HealthLimits:
    """Bounds on what a client of the health port can hold (see the module docstring)."""

    idle_timeout: float = 30.0  # MACHINE_HEALTH_IDLE_TIMEOUT
    header_timeout: float = 5.0
    max_connections: int = 10_000  # MACHINE_HEALTH_MAX_CONNECTIONS, lowered to the fd budget
    max_line_size: int = 4096  # the request target; longer: 414
    max_field_size: int = 8190  # one header line; longer: 431
    max_headers: int = 64  # more: 431
    max_head_bytes: int = 32 * 1024  # line and headers together; more: 431

    def __post_init__(self) -> None:
        # aiohttp raises the same LineTooLong for both; the limit it names tells them apart.
        if self.max_line_size == self.max_field_size:
            raise ValueError("max_line_size and max_field_size must differ")


# A path -> the complete HTTP answer for a plain GET of it now, or None: the app answers it.
FastAnswer = Callable[[str], bytes | None]
FAST_ANSWER_KEY = web.AppKey("fast_answer", FastAnswer)  # type: ignore[arg-type]


class _HttpDate:
    """The Date header's value, formatted once per second (as aiohttp does)."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second, self.text = now, formatdate(now, usegmt=True)
        return self.text


http_date = _HttpDate()


def http_answer(
    status: int, body: bytes, *, close: bool = False, dated: bool = True, **headers: str
) -> bytes:
    """A complete HTTP/1.1 JSON answer with the headers aiohttp's would carry (for the
    answers the protocol sends itself); ``dated=False`` for one prepared once and kept."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        *([f"Date: {http_date()}"] if dated else []),
        f"Server: {SERVER_SOFTWARE}",
        *(["Connection: close"] if close else []),
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def raw_error(status: int, message: str, **headers: str) -> bytes:
    """A complete HTTP/1.1 JSON error answer that closes the connection, for the places
    where no request object exists (a refused connection, a head that never completes)."""
    body = json.dumps({"status": "error", "error": message}).encode()
    # Undated: the refusal at the connection cap is prepared once, when the server starts.
    return http_answer(status, body, close=True, dated=False, **headers)


class _FastParser:
    """aiohttp's request parser, with the requests the protocol answers itself taken out of
    what it hands to aiohttp."""

    __slots__ = ("_parser", "_protocol")

    def __init__(self, parser: Any, protocol: GuardedProtocol) -> None:
        self._parser, self._protocol = parser, protocol

    def feed_data(self, data: bytes) -> tuple[Sequence[Any], bool, bytes]:
        messages, upgraded, tail = self._parser.feed_data(data)
        if messages and not upgraded:
            messages = self._protocol.answer_fast(messages)
        return messages, upgraded, tail

    def __getattr__(self, name: str) -> Any:  # the rest of the parser's interface, unchanged
        return getattr(self._parser, name)


class GuardedProtocol(RequestHandler):
    """aiohttp's request handler with the head timeout, the head-size bound, the connection
    cap and JSON errors for what its parser rejects."""

    __slots__ = ("_admitted", "_guard", "_head_bytes", "_head_timer", "_in_head", "_linger")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        if manager.fast_answer is not None:
            self._parser = _FastParser(self._parser, self)
        self._admitted = False
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open_connections >= guard.limits.max_connections:
            # Refused before aiohttp sees it: no task, no timer, the descriptor freed now.
            guard.note_refused()
            tcp = cast(asyncio.Transport, transport)
            tcp.write(guard.refusal)
            tcp.close()
            return
        self._admitted = True
        guard.open_connections += 1
        super().connection_made(transport)
        self._arm_head_timer()  # the first request head is due within header_timeout too

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._guard.open_connections -= 1
        self._cancel_head_timer()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._in_head and self.transport is not None:
            # Bytes up to the blank line that ends the head (all of them while it has not
            # come): checked before the parser sees them, whether they trickle or come at once.
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            limit = self._guard.limits.max_head_bytes
            if self._head_bytes > limit:
                self._refuse(431, f"request head larger than {limit} bytes")
                return
            if self._head_timer is None:  # first byte of a request after an idle keep-alive
                self._arm_head_timer()
        requests_before = self._request_count  # counts every head the parser completes
        super().data_received(data)
        if self._request_count != requests_before:
            self._in_head, self._head_bytes = False, 0
            self._cancel_head_timer()

    def answer_fast(self, messages: Sequence[Any]) -> Sequence[Any]:
        """Answer the leading plain GETs of ``messages`` the app prepared bytes for; return
        the rest, for aiohttp (in order: nothing is answered past one that waits for it)."""
        if self._messages or self._request_in_progress or self.transport is None:
            return messages
        fast_answer = self._guard.fast_answer
        assert fast_answer is not None
        answered = 0
        for message, payload in messages:
            if (
                message.method != "GET"
                or message.version != HttpVersion11
                or message.should_close
                or message.upgrade
                or payload is not EMPTY_PAYLOAD
            ):
                break
            answer = fast_answer(message.path)
            if answer is None:
                break
            self.transport.write(answer)
            self._parser.message_consumed()
            answered += 1
        if not answered:
            return messages
        self._guard.fast_answered += answered
        # As aiohttp after an answer: idle until the next head, closed after the idle timeout.
        self._in_head, self._head_bytes = True, 0
        self._cancel_head_timer()
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        return messages[answered:]

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        # Answered: idle until the next request's first byte (the idle timeout applies).
        self._in_head, self._head_bytes = True, 0
        return result

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """As aiohttp's, but JSON, with 414/431 for heads over the limits, and no error log
        (a traceback per request) for what clients send wrong: a flood of garbage must not
        flood the agent's log."""
        if isinstance(exc, HttpProcessingError):
            status, text = self._parse_error(exc)
            self.logger.debug("bad request from %s: %s", request.remote, text)
        elif status == 504:
            text = "the answer timed out"
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal error while answering; the agent's log has the details"
        if request.writer.output_size > 0:
            raise ConnectionError("response already partly sent, cannot send the error")
        resp = web.json_response(
            {"status": "error", "error": text}, status=status, headers={"Cache-Control": "no-store"}
        )
        resp.force_close()
        return resp

    def _parse_error(self, exc: HttpProcessingError) -> tuple[int, str]:
        if isinstance(exc, LineTooLong):
            if len(exc.args) > 1 and exc.args[1] == self.max_line_size:
                return 414, f"request line longer than {self.max_line_size} bytes"
            return 431, f"a header line longer than {self.max_field_size} bytes"
        if "too many headers" in exc.message.lower():
            return 431, f"more than {self.max_headers} header lines"
        first = (exc.message or "malformed request").strip().splitlines()[0]
        return 400, f"malformed HTTP request: {first[:200]}"

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self._loop.call_later(
            self._guard.limits.header_timeout, self._head_timed_out
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _busy(self) -> bool:
        """A (pipelined) request is being answered: it owns the stream."""
        return self._request_in_progress or bool(self._messages)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # While a pipelined request is answered, the idle timeout takes over afterwards.
        if self._in_head and self.transport is not None and not self._busy():
            limit = self._guard.limits.header_timeout
            self._refuse(408, f"request head not complete within {limit:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` as JSON and close. The write side is shut first and what the
        client still sends is dropped for at most LINGER_S, so the answer is not lost to a
        reset (closing with unread input sends RST, and the client discards what it got)."""
        self._cancel_head_timer()
        self._in_head = False
        transport = self.transport
        # No answer of ours in the middle of another one.
        if transport is None or transport.is_closing() or self._busy():
            self.force_close()
            return
        transport.write(raw_error(status, message))
        self.close()  # aiohttp: no further request on this connection, input ignored
        if transport.can_write_eof():
            transport.write_eof()  # after the answer is flushed; the client's FIN closes it
        self._linger = self._loop.call_later(LINGER_S, self.force_close)


class GuardedServer(web.Server):
    """aiohttp's low-level server, making GuardedProtocols and counting open connections."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        limits: HealthLimits,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, **handler_kwargs)
        self.limits = limits
        self.open_connections = 0
        self.refused_total = 0
        self.fast_answer: FastAnswer | None = None
        self.fast_answered = 0  # requests answered by the protocol itself
        self.refusal = raw_error(
            503,
            f"the health port holds its maximum of {limits.max_connections} connections; "
            "retry shortly",
            Retry_After="1",
        )
        self._handler_kwargs = handler_kwargs
        self._protocol_loop = asyncio.get_running_loop()
        self._last_refused_log = -REFUSED_LOG_INTERVAL_S

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self, loop=self._protocol_loop, **self._handler_kwargs)

    def note_refused(self) -> None:
        self.refused_total += 1
        now = time.monotonic()
        if now - self._last_refused_log >= REFUSED_LOG_INTERVAL_S:  # once per 10 s at most
            self._last_refused_log = now
            log.warning("health connections refused at the cap", extra={"fields": {
                "max_connections": self.limits.max_connections,
                "refused_total": self.refused_total}})


class HealthRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer with ``limits``."""

    def __init__(self, app: web.Application, limits: HealthLimits, **kwargs: Any) -> None:
        super().__init__(app, handle_signals=False, access_log=None, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        # aiohttp's own: runs the app's startup and freezes it; its handler and request factory
        # are all we take from it.
        base = await super()._make_server()
        limits = self.limits
        server = GuardedServer(
            base.request_handler,
            request_factory=base.request_factory,
            limits=limits,
            access_log=None,
            keepalive_timeout=limits.idle_timeout,
            lingering_time=limits.header_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
        )
        server.fast_answer = self.app.get(FAST_ANSWER_KEY)
        return server

    @property
    def guarded(self) -> GuardedServer:
        assert isinstance(self.server, GuardedServer), "setup() first"
        return self.server
