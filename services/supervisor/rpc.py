"""Typed async client for supervisord's XML-RPC interface over its unix socket."""

from __future__ import annotations

import asyncio
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import SupervisorError
from services.supervisor.states import Fault, ProcessState


@dataclass(frozen=True)
class ProcessInfo:
    """supervisor.getProcessInfo, typed."""

    name: str
    state: ProcessState
    pid: int
    start: int
    exitstatus: int
    spawnerr: str
    description: str

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        return cls(
            name=info["name"],
            state=ProcessState.from_name(info["statename"]),
            pid=int(info["pid"]),
            start=int(info["start"]),
            exitstatus=int(info["exitstatus"]),
            spawnerr=info.get("spawnerr", ""),
            description=info.get("description", ""),
        )


class RpcFault(SupervisorError):
    """supervisord answered with an XML-RPC fault."""

    def __init__(self, method: str, fault: xmlrpc.client.Fault) -> None:
        self.code = fault.faultCode
        self.fault_string = fault.faultString
        super().__init__(f"supervisord refused {method}: {fault.faultString}")


class SupervisorRpc:
    """One call per request; xmlrpc.client blocks, so every call runs in a worker thread."""

    def __init__(self, socket_path: Path) -> None:
        self._url = f"unix://{socket_path}"
        self._socket_path = socket_path

    def _call(self, method: str, *args: Any) -> Any:
        # Loaded at the first call, in a worker thread: a warm boot spawns supervisord before.
        from supervisor.xmlrpc import SupervisorTransport

        # A fresh proxy per call: ServerProxy is not safe to share between threads.
        proxy = xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, self._url)
        )
        try:
            return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as fault:
            raise RpcFault(method, fault) from None
        except OSError as exc:
            raise SupervisorError(
                f"supervisord does not answer on {self._socket_path} ({exc}); is it running? "
                "See logs/supervisord.log in the workspace"
            ) from None

    async def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` (e.g. ``supervisor.getState``) without blocking the event loop."""
        return await asyncio.to_thread(self._call, method, *args)

    async def state(self) -> str:
        return (await self.call("supervisor.getState"))["statename"]

    async def all_processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(i) for i in await self.call("supervisor.getAllProcessInfo")]

    async def process(self, name: str) -> ProcessInfo:
        return ProcessInfo.from_rpc(await self.call("supervisor.getProcessInfo", name))

    async def start(self, name: str) -> None:
        """Ask supervisord to start ``name`` without waiting; already started is not an error."""
        try:
            await self.call("supervisor.startProcess", name, False)
        except RpcFault as fault:
            if fault.code != Fault.ALREADY_STARTED:
                raise

    async def stop(self, name: str) -> None:
        try:
            await self.call("supervisor.stopProcess", name, True)
        except RpcFault as fault:
            if fault.code != Fault.NOT_RUNNING:
                raise

    async def tail_log(self, name: str, nbytes: int = 4096) -> str:
        """The last ``nbytes`` of the program's log (stdout with stderr redirected into it)."""
        text, _offset, _overflow = await self.call(
            "supervisor.tailProcessStdoutLog", name, 0, nbytes
        )
        return text
