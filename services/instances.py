"""Instance control: supervisord's events and the agent's pidfds turned into MachineState, plus a
short reconcile loop that starts every instance whose port is free."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import psutil

from config.errors import SupervisorError
from services.plan import NodePlan
from services.ports import port_in_use
from services.state import InstanceState, MachineState, Phase
from services.supervisor.daemon import Supervisord
from services.supervisor.events import EventReceiver, ProcessEvent
from services.supervisor.rpc import ProcessInfo, RpcFault
from services.supervisor.states import (
    EXITED_STATES,
    RESTART_FROM_STATES,
    UP_STATES,
    Fault,
    ProcessState,
)

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 12
# Events are pushed; this resync only repairs a dropped datagram, so it can be slow.
RESYNC_INTERVAL_S = 15.0


def kill_leftovers(pid: int) -> None:
    """Kill what remains of an exited instance's process group (children that ignored SIGINT
    or outlived a crash would hold GPU memory). supervisord makes each program a group leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class InstanceController:
    """Owns the supervisord child for one NodePlan and keeps MachineState in step with it."""

    def __init__(self, plan: NodePlan, state: MachineState, check_interval: float) -> None:
        self.plan = plan
        self.state = state
        self.supervisord = Supervisord(plan)
        self._check_interval = check_interval
        self._by_name: dict[str, InstanceState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watched: dict[str, tuple[int, int]] = {}  # name -> (pid, pidfd)
        self._receiver = EventReceiver(plan.events_socket, self._on_event)
        self._tasks: set[asyncio.Task[None]] = set()
        for inst in plan.instances:
            self._by_name[inst.name] = state.instances[inst.gpu]
            self._locks[inst.name] = asyncio.Lock()

    async def start(self) -> None:
        """Listen for events, then start supervisord (events from its first moment count)."""
        self.supervisord.prepare_dirs()
        await self._receiver.start()
        self.state.supervisor_expected = True
        await self.supervisord.start()
        self.state.supervisor_up = True
        self.state.changed()
        await self.resync()

    def _spawn(self, coro: asyncio.Future | asyncio.Task | object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, event: ProcessEvent) -> None:
        inst = self._by_name.get(event.process)
        if inst is None:
            return
        if event.to_state is ProcessState.STARTING and event.from_state in RESTART_FROM_STATES:
            inst.restarts += 1
        if event.to_state in EXITED_STATES:
            inst.pid_exited = True
        inst.process_state = event.to_state
        if event.pid:
            self._adopt_pid(inst, event.pid)
        if inst.quarantined and event.to_state in (ProcessState.STARTING, ProcessState.BACKOFF):
            # supervisord's autorestart raced the quarantine: stop it again.
            self._spawn(self._stop(inst), f"quarantine-{event.process}")
        self.state.changed()
        _log_transition(event.process, event.from_state, event.to_state, event.pid)
        self._spawn(self.refresh(event.process), f"refresh-{event.process}")

    async def refresh(self, name: str) -> None:
        """Re-read one process from supervisord (pid, times, errors) into the state."""
        async with self._locks[name]:
            try:
                info = await self.supervisord.rpc.process(f"{self.plan.group}:{name}")
            except RpcFault as fault:
                if fault.code != Fault.SHUTDOWN_STATE:  # expected while the node stops
                    log.warning(
                        "cannot refresh process",
                        extra={"fields": {"instance": name, "error": str(fault)}},
                    )
                return
            except SupervisorError as exc:
                # While the node stops, supervisord going away under a refresh is expected.
                level = logging.DEBUG if self.state.phase is Phase.STOPPING else logging.WARNING
                log.log(level, "cannot refresh process",
                        extra={"fields": {"instance": name, "error": str(exc)}})
                return
            await self._apply(self._by_name[name], info)

    async def resync(self) -> None:
        """Re-read every process; repairs anything a dropped event left stale."""
        infos = await self.supervisord.rpc.all_processes()
        for info in infos:
            inst = self._by_name.get(info.name)
            if inst is not None:
                async with self._locks[info.name]:
                    await self._apply(inst, info)

    async def _apply(self, inst: InstanceState, info: ProcessInfo) -> None:
        inst.process_state = info.state
        inst.spawn_error = info.spawnerr or None
        inst.exit_description = (
            info.description
            if info.state not in UP_STATES
            else None
        )
        if info.pid:
            self._adopt_pid(inst, info.pid)
            inst.started_at = float(info.start)
        if info.state in EXITED_STATES:
            inst.pid_exited = True
            await self._read_log_tail(inst)
        self.state.changed()

    async def _read_log_tail(self, inst: InstanceState) -> None:
        try:
            text = await self.supervisord.rpc.tail_log(f"{self.plan.group}:{inst.plan.name}")
        except SupervisorError:
            return
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        inst.log_tail = lines[-LOG_TAIL_LINES:]

    def _adopt_pid(self, inst: InstanceState, pid: int) -> None:
        """A new pid means a new process: forget the old one's facts and watch this one die."""
        if inst.pid == pid:
            return
        inst.pid = pid
        inst.reset_runtime()
        inst.log_tail = []
        inst.started_at = time.time()
        self._watch(inst, pid)

    def _watch(self, inst: InstanceState, pid: int) -> None:
        # A pidfd turns readable the instant the process exits; supervisord only reaps it on
        # its next loop turn (up to a second later), so this is what makes 503 immediate.
        self._unwatch(inst.plan.name)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            inst.pid_exited = True
            return
        except OSError:  # kernel without pidfd: supervisord's event still reports the exit
            return
        loop = asyncio.get_running_loop()
        self._watched[inst.plan.name] = (pid, fd)

        def exited() -> None:
            self._unwatch(inst.plan.name)
            kill_leftovers(pid)
            if inst.pid == pid:
                inst.pid_exited = True
                log.warning(
                    "instance process exited",
                    extra={"fields": {"instance": inst.plan.name, "pid": pid}},
                )
                self.state.changed()

        loop.add_reader(fd, exited)

    def _unwatch(self, name: str) -> None:
        watched = self._watched.pop(name, None)
        if watched is not None:
            _pid, fd = watched
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def start_instance(self, inst: InstanceState) -> None:
        """Start one instance if its port is free; otherwise say who holds it."""
        plan = inst.plan
        holder = await asyncio.to_thread(port_in_use, plan.listen, plan.port)
        if holder:
            reason = (
                f"{plan.name} not started: port {plan.port} on {plan.listen} is already in use "
                f"by {holder}; stop that process or change COMFYUI_PORT_START (retrying)"
            )
            if inst.blocked_reason != reason:
                log.warning(
                    "port in use",
                    extra={"fields": {"instance": plan.name, "port": plan.port, "holder": holder}},
                )
                inst.blocked_reason = reason
                self.state.changed()
            return
        if inst.blocked_reason:
            inst.blocked_reason = None
            self.state.changed()
        if inst.quarantined:  # quarantined while the port was checked
            return
        await self.supervisord.rpc.start(f"{self.plan.group}:{plan.name}")

    async def quarantine(self, gpu_uuid: str, reason: str) -> None:
        """Take a GPU out of service: stop its instance and never start it again."""
        for inst in self.state.instances.values():
            if inst.plan.gpu_uuid != gpu_uuid or inst.quarantined:
                continue
            inst.quarantined = reason
            self.state.changed()
            log.error(
                "GPU quarantined",
                extra={"fields": {"instance": inst.plan.name, "gpu_uuid": gpu_uuid,
                                  "reason": reason}},
            )
            await self._stop(inst)

    async def _stop(self, inst: InstanceState) -> None:
        async with self._locks[inst.plan.name]:
            try:
                await self.supervisord.rpc.stop(f"{self.plan.group}:{inst.plan.name}")
            except SupervisorError as exc:
                log.warning(
                    "cannot stop a quarantined instance",
                    extra={"fields": {"instance": inst.plan.name, "error": str(exc)}},
                )
        await self.refresh(inst.plan.name)

    async def run(self) -> None:
        """Reconcile until cancelled: start stopped instances, notice supervisord dying."""
        watcher = asyncio.ensure_future(self.supervisord.wait())
        last_resync = time.monotonic()
        try:
            while True:
                for inst in self.state.instances.values():
                    if inst.process_state is ProcessState.STOPPED and not inst.quarantined:
                        await self.start_instance(inst)
                done, _ = await asyncio.wait({watcher}, timeout=self._check_interval)
                if done:
                    code = watcher.result()
                    self.state.supervisor_up = False
                    self.state.changed()
                    raise SupervisorError(
                        f"supervisord exited unexpectedly (code {code}); see "
                        f"{self.plan.log_dir / 'supervisord.log'}"
                    )
                if time.monotonic() - last_resync > RESYNC_INTERVAL_S:
                    last_resync = time.monotonic()
                    await self.resync()
        finally:
            watcher.cancel()

    async def _stop_orphans(self) -> None:
        """Instances that outlived supervisord (it was killed): SIGINT their process groups,
        as supervisord would, then SIGKILL what is left after the stop timeout."""
        groups = []
        for inst in self.state.instances.values():
            if inst.pid is None:
                continue
            try:
                if os.getpgid(inst.pid) == inst.pid:  # still the group leader we started
                    groups.append(psutil.Process(inst.pid))
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not groups:
            return
        log.warning("stopping instances orphaned by supervisord",
                    extra={"fields": {"pids": [p.pid for p in groups]}})
        for proc in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGINT)
        _, alive = await asyncio.to_thread(psutil.wait_procs, groups,
                                           self.plan.policy.stop_timeout)
        for proc in groups:
            kill_leftovers(proc.pid)
        await asyncio.to_thread(psutil.wait_procs, alive, 5)

    def _record_stopped(self) -> None:
        """Log STOPPING -> STOPPED for instances whose last event supervisord's shutdown cut off
        (its event listener stops with it), so every instance's stop shows in the log."""
        for name, inst in self._by_name.items():
            if inst.process_state is not ProcessState.STOPPED:
                _log_transition(name, inst.process_state, ProcessState.STOPPED, inst.pid)
                inst.process_state = ProcessState.STOPPED

    async def stop(self) -> None:
        """Stop every instance, then supervisord; release the event socket and pidfds."""
        for task in list(self._tasks):
            task.cancel()
        for name in list(self._watched):
            self._unwatch(name)
        await self.supervisord.stop()
        await self._stop_orphans()
        self._record_stopped()
        self.state.supervisor_up = False
        self.state.changed()
        self._receiver.close()
        self.supervisord.remove_socket()


def _log_transition(name: str, before: ProcessState, after: ProcessState, pid: int | None) -> None:
    log.info(
        "process state",
        extra={"fields": {"instance": name, "from": before.name, "to": after.name, "pid": pid}},
    )
