"""Agent side of the event relay: a unix datagram socket fed by services.supervisor.listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.files import file_identity, unlink_if_same
from services.supervisor.states import ProcessState

log = logging.getLogger(__name__)

STATE_EVENT_PREFIX = "PROCESS_STATE_"


@dataclass(frozen=True)
class ProcessEvent:
    """A PROCESS_STATE_* event from supervisord."""

    serial: int
    process: str
    to_state: ProcessState
    from_state: ProcessState
    pid: int | None
    expected: bool | None

    @classmethod
    def from_message(cls, message: dict) -> ProcessEvent | None:
        """Parse a relayed message; None for anything that is not a process state change."""
        name = message.get("event", "")
        if not name.startswith(STATE_EVENT_PREFIX):
            return None
        payload = message.get("payload", {})
        pid = payload.get("pid")
        expected = payload.get("expected")
        return cls(
            serial=int(message.get("serial", 0)),
            process=payload.get("processname", ""),
            to_state=ProcessState.from_name(name.removeprefix(STATE_EVENT_PREFIX)),
            from_state=ProcessState.from_name(payload.get("from_state", "")),
            pid=int(pid) if pid else None,
            expected=None if expected is None else expected == "1",
        )


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_event: Callable[[ProcessEvent], None]) -> None:
        self._on_event = on_event

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            event = ProcessEvent.from_message(json.loads(data))
        except (ValueError, TypeError) as exc:
            log.warning("bad event datagram: %s", exc)
            return
        if event is not None:
            self._on_event(event)


class EventReceiver:
    """Listens on ``path`` and calls ``on_event`` in the event loop for each state change."""

    def __init__(self, path: Path, on_event: Callable[[ProcessEvent], None]) -> None:
        self._path = path
        self._on_event = on_event
        self._transport: asyncio.DatagramTransport | None = None
        self._bound: tuple[int, int] | None = None  # the socket file we created

    async def start(self, bound: socket.socket | None = None) -> None:
        """Bind the socket (or take ``bound``, already bound to it: a head start's, whose
        datagrams wait in it) and receive."""
        sock = bound if bound is not None else self._bind()
        self._bound = file_identity(self._path)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._on_event), sock=sock
        )

    def _bind(self) -> socket.socket:
        # A socket already here is a dead owner's: the workspace lock keeps live ones out.
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self._path))
        self._path.chmod(0o600)
        return sock

    def close(self) -> None:
        # Only the socket this receiver bound, never one another agent has bound since; checked
        # while ours is still open, so its inode cannot have been reused by theirs.
        unlink_if_same(self._path, self._bound)
        self._bound = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
