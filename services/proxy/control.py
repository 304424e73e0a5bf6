"""The proxy's process under supervisord: supervisord's events and a pidfd turned into
ProxyState, its start once its public ports are free, and a start again after a backoff when
supervisord gave up on it (FATAL). Driven by services/instances.py's InstanceController, which
owns supervisord and hands this the proxy's events, process infos and reconcile passes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import SecretStr

from config.errors import SupervisorError
from services.backoff import BackoffPolicy, delay_for
from services.files import atomic_write_text
from services.plan import ProxyPlan
from services.ports import port_in_use
from services.proxy.caddy_config import render_caddy_config
from services.state import MachineState, ProxyState
from services.supervisor.rpc import ProcessInfo, SupervisorRpc
from services.supervisor.states import EXITED_STATES, RESTART_FROM_STATES, UP_STATES, ProcessState

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 12
# States from which the agent may start the proxy (again).
STARTABLE_STATES = frozenset({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL})

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


def write_proxy_config(plan: ProxyPlan, token: SecretStr) -> None:
    """Write Caddy's config (it holds the token) 0600 into the 0700 run directory, and make
    Caddy's own directories there, so nothing of it lands in a shared HOME."""
    for directory in (plan.config_path.parent, plan.home):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    atomic_write_text(
        plan.config_path, render_caddy_config(plan, token.get_secret_value()), mode=0o600
    )


class ProxyControl:
    """Keeps ``state.proxy`` in step with the proxy program and starts it when due."""

    def __init__(
        self,
        state: MachineState,
        proxy: ProxyState,
        rpc: SupervisorRpc,
        spawn: Spawn,
        backoff: BackoffPolicy,
    ) -> None:
        self.state = state
        self.proxy = proxy
        self.name = proxy.plan.name
        self._rpc = rpc
        self._spawn = spawn
        self._backoff = backoff
        self._lock = asyncio.Lock()
        self._watched: tuple[int, int] | None = None  # (pid, pidfd)

    @property
    def rpc_name(self) -> str:
        # A program outside any [group] is a group of its own name.
        return f"{self.name}:{self.name}"

    def on_event(self, to_state: ProcessState, from_state: ProcessState, pid: int | None) -> None:
        """A PROCESS_STATE event of the proxy program."""
        proxy = self.proxy
        if (
            to_state is ProcessState.STARTING
            and from_state in RESTART_FROM_STATES
            and proxy.next_start_at is None
        ):
            proxy.restarts += 1
        late = proxy.late_exit(to_state, pid)
        if to_state in EXITED_STATES and not late:
            proxy.pid_exited = True
        if to_state is ProcessState.FATAL:
            self._hold(time.time())
        if not late:
            proxy.process_state = to_state
            if pid:
                self._adopt_pid(pid)
        if to_state in UP_STATES:
            proxy.blocked_reason = None  # it runs: whatever held its ports let go
        self.state.changed()
        log.log(
            logging.WARNING if to_state in EXITED_STATES else logging.INFO,
            "proxy state",
            extra={"fields": {"program": self.name, "from": from_state.name, "to": to_state.name,
                              "pid": pid}},
        )
        self._spawn(self.refresh(), f"refresh-{self.name}")

    async def refresh(self) -> None:
        """Re-read the proxy program from supervisord (pid, errors, its log's last lines)."""
        async with self._lock:
            try:
                info = await self._rpc.process(self.rpc_name)
            except SupervisorError as exc:
                log.debug("cannot refresh proxy", extra={"fields": {"error": str(exc)}})
                return
            await self.apply(info)

    async def apply(self, info: ProcessInfo) -> None:
        """What supervisord says of the proxy (a refresh, or the controller's resync)."""
        proxy = self.proxy
        if info.state is ProcessState.FATAL and proxy.next_start_at is None:
            self._hold(time.time())  # its FATAL event was lost
        proxy.process_state = info.state
        proxy.spawn_error = info.spawnerr or None
        proxy.exit_description = info.description if info.state not in UP_STATES else None
        if info.pid:
            self._adopt_pid(info.pid)
            proxy.started_at = float(info.start)
        if info.state in EXITED_STATES:
            proxy.pid_exited = True
            with contextlib.suppress(SupervisorError):
                text = await self._rpc.tail_log(self.rpc_name)
                lines = [line.rstrip() for line in text.splitlines() if line.strip()]
                proxy.log_tail = lines[-LOG_TAIL_LINES:]
        self.state.changed()

    def _adopt_pid(self, pid: int) -> None:
        if self.proxy.adopt(pid, time.time()):
            self._watch(pid)

    def _watch(self, pid: int) -> None:
        """A pidfd: the proxy's death shows in health at once, not on supervisord's next turn."""
        self.unwatch()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.proxy.pid_exited = True
            return
        except OSError:  # no pidfd: supervisord's event still reports the exit
            return
        self._watched = (pid, fd)

        def exited() -> None:
            self.unwatch()
            if self.proxy.pid == pid:
                self.proxy.pid_exited = True
                log.warning("proxy process exited",
                            extra={"fields": {"program": self.name, "pid": pid}})
                self.state.changed()

        asyncio.get_running_loop().add_reader(fd, exited)

    def unwatch(self) -> None:
        if self._watched is not None:
            _pid, fd = self._watched
            self._watched = None
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _hold(self, now: float) -> None:
        """supervisord gave up (FATAL): start it again after a doubling wait."""
        proxy = self.proxy
        proxy.attempt += 1
        delay = delay_for(proxy.attempt, self._backoff)
        proxy.next_start_at = now + delay
        log.warning("proxy backoff", extra={"fields": {"program": self.name,
                                                       "attempt": proxy.attempt,
                                                       "delay_s": delay}})
        self.state.changed()

    def next_due(self, now: float) -> float | None:
        """Seconds until a held start is due, or None when none is held."""
        due = self.proxy.next_start_at
        return None if due is None else due - now

    async def reconcile(self, now: float) -> None:
        """Start the proxy when it is stopped (first start) or its backoff is over."""
        proxy = self.proxy
        if proxy.serving and proxy.attempt:
            proxy.attempt = 0  # it serves again: the next FATAL waits the first delay
        if proxy.next_start_at is not None:
            if now < proxy.next_start_at:
                return
            if proxy.process_state in UP_STATES:
                proxy.next_start_at = None
                return
            if proxy.process_state in STARTABLE_STATES and await self.start():
                proxy.next_start_at = None
                proxy.restarts += 1
                log.info("proxy started after backoff",
                         extra={"fields": {"program": self.name, "attempt": proxy.attempt}})
            return
        if proxy.process_state is ProcessState.STOPPED:
            await self.start()

    async def start(self) -> bool:
        """Start the proxy if every public port is free (True); otherwise say who holds one."""
        proxy = self.proxy
        plan = proxy.plan
        for port in plan.ports:
            holder = await asyncio.to_thread(port_in_use, plan.listen, port)
            if holder:
                reason = (
                    f"{self.name} (Caddy) not started: public port {port} on {plan.listen} is "
                    f"already in use by {holder}; stop that process or change "
                    "COMFYUI_PORT_START (retrying)"
                )
                if proxy.blocked_reason != reason:
                    log.warning("port in use", extra={"fields": {
                        "program": self.name, "port": port, "holder": holder}})
                    proxy.blocked_reason = reason
                    self.state.changed()
                return False
        if proxy.blocked_reason:
            proxy.blocked_reason = None
            self.state.changed()
        try:
            await self._rpc.start(self.rpc_name)
        except SupervisorError as exc:
            log.warning("cannot start proxy", extra={"fields": {"program": self.name,
                                                                "error": str(exc)}})
            self._hold(time.time())
            return False
        # Started: until its STARTING event comes, a next pass must not take it for stopped
        # (and find its public ports taken, by itself).
        if proxy.process_state in STARTABLE_STATES:
            proxy.process_state = ProcessState.STARTING
            self.state.changed()
        self._spawn(self.refresh(), f"refresh-{self.name}")
        return True
