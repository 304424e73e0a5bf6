"""Instance control: supervisord's events and the agent's pidfds turned into MachineState, plus a
short reconcile loop that starts every instance whose port is free, and starts again after a
backoff (services/backoff.py) an instance that went FATAL or crash-loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import psutil

from config.errors import SupervisorError
from services.backoff import BackoffPolicy, Decision, Failure, after_failure, stable
from services.plan import NodePlan
from services.ports import port_in_use
from services.proxy.control import ProxyControl
from services.state import InstanceState, MachineState, Phase
from services.supervisor.daemon import Supervisord
from services.supervisor.events import EventReceiver, ProcessEvent
from services.supervisor.head_start import HeadStart
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
# After a crash: how long and how often the agent turns supervisord's loop (_nudge).
RESPAWN_NUDGE_S = 1.0
RESPAWN_NUDGE_EVERY_S = 0.005
# States from which the agent may start a process whose backoff is over.
STARTABLE_STATES = frozenset({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL})


def kill_leftovers(pid: int) -> None:
    """Kill what remains of an exited instance's process group (children that ignored SIGINT
    or outlived a crash would hold GPU memory). supervisord makes each program a group leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class InstanceController:
    """Owns the supervisord child for one NodePlan and keeps MachineState in step with it."""

    def __init__(
        self,
        plan: NodePlan,
        state: MachineState,
        check_interval: float,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.plan = plan
        self.state = state
        self.supervisord = Supervisord(plan)
        self.backoff = backoff or BackoffPolicy()
        self._check_interval = check_interval
        # Wakes the reconcile loop when a backoff is set (it may end before the next check).
        self._wake = asyncio.Event()
        # Instances whose current FATAL was counted (so a resync does not count it again).
        self._fatal_counted: set[str] = set()
        self._by_name: dict[str, InstanceState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watched: dict[str, tuple[int, int]] = {}  # name -> (pid, pidfd)
        self._receiver = EventReceiver(plan.events_socket, self._on_event)
        # COMFYUI_EXPOSE=proxy: the proxy program, driven from the same events and passes.
        self.proxy = (
            ProxyControl(state, state.proxy, self.supervisord.rpc, self._spawn, self.backoff)
            if state.proxy is not None
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        for inst in plan.instances:
            self._by_name[inst.name] = state.instances[inst.gpu]
            self._locks[inst.name] = asyncio.Lock()

    async def launch(self, start_now: bool = False, head: HeadStart | None = None) -> None:
        """Listen for events, then spawn supervisord (events from its first moment count); with
        ``start_now`` it starts every instance whose port is free itself, at once (a warm boot:
        no RPC round trip before ComfyUI's own start). ``head``: a head start's supervisord,
        already started from this plan's very conf, is adopted instead."""
        self.supervisord.prepare_dirs()
        await self._receiver.start(head.events if head is not None else None)
        self.state.supervisor_expected = True
        if head is not None:
            self.supervisord.adopt(head)
            return
        autostart = []
        if start_now:
            for inst in self.state.instances.values():
                if not inst.quarantined and await self._port_free(inst):
                    autostart.append(inst.plan.name)
        await self.supervisord.spawn(autostart)

    async def attach(self) -> None:
        """Wait for the launched supervisord's RPC and read every process from it."""
        await self.supervisord.wait_answering()
        self.state.supervisor_up = True
        self.state.changed()
        await self.resync()

    def _spawn(self, coro: asyncio.Future | asyncio.Task | object, name: str) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, event: ProcessEvent) -> None:
        if self.proxy is not None and event.process == self.proxy.name:
            self.proxy.on_event(event.to_state, event.from_state, event.pid)
            return
        inst = self._by_name.get(event.process)
        if inst is None:
            return
        if (
            event.to_state is ProcessState.STARTING
            and event.from_state in RESTART_FROM_STATES
            and not inst.in_backoff  # a restart the backoff stops; its held start counts
        ):
            inst.restarts += 1
        late = inst.late_exit(event.to_state, event.pid)
        if event.to_state in EXITED_STATES and not late:
            inst.pid_exited = True
        # Before the new pid is adopted: the failure is judged by the start of the one that died.
        if event.to_state is ProcessState.EXITED and event.from_state is ProcessState.RUNNING:
            self._failed(inst, Failure.CRASH)
        elif event.to_state is ProcessState.FATAL:
            self._failed(inst, Failure.FATAL)
        elif event.to_state in UP_STATES:
            self._fatal_counted.discard(event.process)
        if not late:
            inst.process_state = event.to_state
            if event.pid:
                self._adopt_pid(inst, event.pid)
        if (inst.quarantined or inst.in_backoff) and event.to_state in (
            ProcessState.STARTING,
            ProcessState.BACKOFF,
        ):
            # supervisord's autorestart raced the quarantine or the backoff: stop it again.
            why = "quarantine" if inst.quarantined else "backoff"
            self._spawn(self._stop(inst), f"{why}-{event.process}")
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
            elif self.proxy is not None and info.name == self.proxy.name:
                await self.proxy.apply(info)

    async def _apply(self, inst: InstanceState, info: ProcessInfo) -> None:
        if info.state is ProcessState.FATAL and inst.plan.name not in self._fatal_counted:
            self._failed(inst, Failure.FATAL)  # its FATAL event was lost
        elif info.state in UP_STATES:
            self._fatal_counted.discard(inst.plan.name)
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
        inst.log_tail = _tail_lines(text)

    def _adopt_pid(self, inst: InstanceState, pid: int) -> None:
        """A new pid means a new process: forget the old one's facts and watch this one die."""
        if inst.adopt(pid, time.time()):
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
                self._nudge_if_restarting(inst, pid)

        loop.add_reader(fd, exited)

    def _nudge_if_restarting(self, inst: InstanceState, pid: int) -> None:
        """A running instance crashed and supervisord restarts it (a first crash, nothing
        holding it): wake supervisord now so that its restart comes at once, not on its next
        loop turn (up to 1 s: it reaps on a turn and restarts on the one after, and a process
        whose pipes stay open wakes it for neither). Only supervisord's own autorestart starts
        it, so its accounting (the EXITED -> STARTING event, ``restarts``) and a stop that an
        operator or the backoff asked for stay as they are; a crash the backoff will hold
        (the 2nd+ of a streak) is not nudged."""
        if inst.quarantined or inst.in_backoff or inst.process_state is not ProcessState.RUNNING:
            return
        if self.state.phase is Phase.STOPPING:
            return
        decision = after_failure(
            Failure.CRASH, inst.failures, inst.attempt, inst.started_at, time.time(), self.backoff
        )
        if decision.delay_s <= 0:
            self._spawn(self._nudge(inst.plan.name, pid), f"respawn-{inst.plan.name}")

    async def _nudge(self, name: str, pid: int) -> None:
        """Ask supervisord about ``name`` until it has reaped ``pid`` and taken its decision
        (a new process, or a state it does not restart from): each call is one turn of its
        loop. Gives up after RESPAWN_NUDGE_S, when its own timer has turned the loop anyway."""
        deadline = time.monotonic() + RESPAWN_NUDGE_S
        while time.monotonic() < deadline:
            try:
                info = await self.supervisord.rpc.process(f"{self.plan.group}:{name}")
            except SupervisorError:
                return
            if info.pid != pid and info.state is not ProcessState.EXITED:
                return  # restarted (STARTING, new pid), or stopped, FATAL, BACKOFF: decided
            await asyncio.sleep(RESPAWN_NUDGE_EVERY_S)

    def _unwatch(self, name: str) -> None:
        watched = self._watched.pop(name, None)
        if watched is not None:
            _pid, fd = watched
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _failed(self, inst: InstanceState, kind: Failure) -> None:
        """Count a FATAL or a crash toward the instance's backoff; hold its next start when the
        policy says so (supervisord's own restart, if it races this, is stopped again)."""
        name = inst.plan.name
        if kind is Failure.FATAL:
            self._fatal_counted.add(name)
        if inst.quarantined:
            return  # never started again anyway
        now = time.time()
        decision = after_failure(
            kind, inst.failures, inst.attempt, inst.started_at, now, self.backoff
        )
        if decision.failures == 1:
            inst.crash_times = []
        if kind is Failure.CRASH:
            inst.crash_times.append(now)
        inst.failures, inst.attempt = decision.failures, decision.attempt
        fields = {"instance": name, "failure": kind.value, "failures": decision.failures}
        if decision.delay_s <= 0:
            log.warning("instance crashed; supervisord restarts it", extra={"fields": fields})
            self.state.changed()
            return
        self._hold(inst, decision, now)
        log.warning(
            "instance backoff",
            extra={"fields": {**fields, "attempt": decision.attempt,
                              "delay_s": decision.delay_s}},
        )
        if kind is Failure.CRASH:
            self._spawn(self._damp(inst), f"backoff-{name}")

    async def _damp(self, inst: InstanceState) -> None:
        """Stop supervisord's immediate restart of a crash-looping instance (again when its
        STARTING event comes, should this stop find it between exit and restart), keeping the
        crash's last log lines for health: the restarted process has barely written yet."""
        try:
            text = await self.supervisord.rpc.tail_log(f"{self.plan.group}:{inst.plan.name}")
        except SupervisorError:
            text = ""
        await self._stop(inst)
        lines = _tail_lines(text)
        if lines and inst.in_backoff:
            inst.log_tail = lines
            self.state.changed()

    def _hold(self, inst: InstanceState, decision: Decision, now: float) -> None:
        inst.next_start_at = now + decision.delay_s
        inst.backoff_s = decision.delay_s
        self.state.changed()
        self._wake.set()

    def _release(self, inst: InstanceState) -> None:
        inst.next_start_at = None
        inst.backoff_s = None
        self.state.changed()

    async def _start_held(self, inst: InstanceState) -> None:
        """The backoff is over: start it (port permitting) as the next attempt."""
        due, wait = inst.next_start_at, inst.backoff_s
        # Released first: this start's STARTING event must not look like an autorestart that
        # the backoff stops (it may arrive before supervisord's answer does).
        self._release(inst)
        try:
            started = await self.start_instance(inst)
        except SupervisorError as exc:
            # supervisord refused (e.g. the command cannot be spawned): a failed attempt.
            log.warning(
                "cannot start instance after backoff",
                extra={"fields": {"instance": inst.plan.name, "error": str(exc)}},
            )
            self._failed(inst, Failure.FATAL)
            return
        if not started:
            # Its port is taken (start_instance says so): still due, the next pass retries.
            if not inst.quarantined:
                inst.next_start_at, inst.backoff_s = due, wait
            return
        inst.backoff_starts += 1
        inst.restarts += 1
        log.info(
            "instance started after backoff",
            extra={"fields": {"instance": inst.plan.name, "attempt": inst.attempt}},
        )

    def _forget_if_stable(self, inst: InstanceState, now: float) -> None:
        """A process that ran INSTANCE_STABLE_SECS ends its streak of failures."""
        if inst.failures and not inst.in_backoff and inst.process_alive and stable(
            inst.started_at, now, self.backoff
        ):
            log.info(
                "instance stable again",
                extra={"fields": {"instance": inst.plan.name, "failures": inst.failures}},
            )
            inst.failures, inst.attempt, inst.crash_times = 0, 0, []
            self.state.changed()

    async def start_instance(self, inst: InstanceState) -> bool:
        """Start one instance if its port is free (True); otherwise say who holds it."""
        if not await self._port_free(inst):
            return False
        if inst.quarantined:  # quarantined while the port was checked
            return False
        await self.supervisord.rpc.start(f"{self.plan.group}:{inst.plan.name}")
        return True

    async def _port_free(self, inst: InstanceState) -> bool:
        """The instance's port is free; else its blocked_reason says who holds it."""
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
            return False
        if inst.blocked_reason:
            inst.blocked_reason = None
            self.state.changed()
        return True

    async def stop_instances(self) -> None:
        """Stop every instance (supervisord stays): a warm start found something to install."""
        await asyncio.gather(*(self._stop(inst) for inst in self.state.instances.values()))

    async def quarantine(self, gpu_uuid: str, reason: str) -> None:
        """Take a GPU out of service: stop its instance and never start it again."""
        for inst in self.state.instances.values():
            if inst.plan.gpu_uuid != gpu_uuid or inst.quarantined:
                continue
            inst.quarantined = reason
            inst.next_start_at = inst.backoff_s = None  # a held start will never come
            self.state.changed()
            log.error(
                "GPU quarantined",
                extra={"fields": {"instance": inst.plan.name, "gpu_uuid": gpu_uuid,
                                  "reason": reason}},
            )
            await self._stop(inst)

    async def restart(self, inst: InstanceState) -> None:
        """An operator's restart: a held start is released, the streak of failures forgotten
        (someone acted), and the process stopped and started again now (port permitting)."""
        if inst.in_backoff:
            self._release(inst)
        inst.failures, inst.attempt, inst.crash_times = 0, 0, []
        await self._stop(inst)
        await self.start_instance(inst)
        self._wake.set()

    def lift_quarantine(self, inst: InstanceState) -> None:
        """Its GPU passed the self-test again and NVML finds it healthy: back in service (the
        reconcile loop starts the stopped instance at once)."""
        if inst.quarantined is None:
            return
        log.warning("GPU quarantine lifted", extra={"fields": {
            "instance": inst.plan.name, "gpu_uuid": inst.plan.gpu_uuid,
            "was": inst.quarantined}})
        inst.quarantined = None
        inst.failures, inst.attempt, inst.crash_times = 0, 0, []
        for status in self.state.gpus.values():
            if status.uuid == inst.plan.gpu_uuid:
                status.quarantined, status.quarantine_reason = False, None
                status.unhealthy_samples = 0
        self.state.changed()
        self._wake.set()

    async def _stop(self, inst: InstanceState) -> None:
        async with self._locks[inst.plan.name]:
            try:
                await self.supervisord.rpc.stop(f"{self.plan.group}:{inst.plan.name}")
            except SupervisorError as exc:
                log.warning(
                    "cannot stop instance",
                    extra={"fields": {"instance": inst.plan.name, "error": str(exc)}},
                )
        await self.refresh(inst.plan.name)

    async def run(self) -> None:
        """Reconcile until cancelled: start stopped instances, notice supervisord dying."""
        watcher = asyncio.ensure_future(self.supervisord.wait())
        last_resync = time.monotonic()
        try:
            while True:
                await self._reconcile(time.time())
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait(
                    {watcher, wake},
                    timeout=self._next_check(time.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                wake.cancel()
                if watcher in done:
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

    async def _reconcile(self, now: float) -> None:
        for inst in self.state.instances.values():
            if inst.quarantined:
                continue
            if inst.next_start_at is not None:
                if now < inst.next_start_at:
                    continue
                if inst.process_state in UP_STATES:
                    self._release(inst)  # up already (a stop that lost a race): nothing to do
                elif inst.process_state in STARTABLE_STATES:
                    await self._start_held(inst)
            elif inst.process_state is ProcessState.STOPPED:
                await self.start_instance(inst)
            self._forget_if_stable(inst, now)
        if self.proxy is not None:
            await self.proxy.reconcile(now)

    def _next_check(self, now: float) -> float:
        """Seconds to the next pass: the check interval, or sooner when a backoff ends."""
        due = [i.next_start_at - now for i in self.state.instances.values()
               if i.next_start_at is not None and not i.quarantined]
        proxy_due = self.proxy.next_due(now) if self.proxy is not None else None
        if proxy_due is not None:
            due.append(proxy_due)
        return max(min([self._check_interval, *due]), 0.01)

    async def _stop_orphans(self) -> None:
        """Instances that outlived supervisord (it was killed): SIGINT their process groups,
        as supervisord would, then SIGKILL what is left after the stop timeout."""
        groups = []
        pids = [inst.pid for inst in self.state.instances.values()]
        if self.state.proxy is not None:
            pids.append(self.state.proxy.pid)  # Caddy would hold the public ports
        for pid in pids:
            if pid is None:
                continue
            try:
                if os.getpgid(pid) == pid:  # still the group leader we started
                    groups.append(psutil.Process(pid))
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
        """Stop every instance, then supervisord; release the event socket and pidfds. Once."""
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for name in list(self._watched):
            self._unwatch(name)
        if self.proxy is not None:
            self.proxy.unwatch()
        await self.supervisord.stop()
        await self._stop_orphans()
        self._record_stopped()
        self.state.supervisor_up = False
        self.state.changed()
        self._receiver.close()
        self.supervisord.remove_socket()


def _tail_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-LOG_TAIL_LINES:]


def _log_transition(name: str, before: ProcessState, after: ProcessState, pid: int | None) -> None:
    log.info(
        "process state",
        extra={"fields": {"instance": name, "from": before.name, "to": after.name, "pid": pid}},
    )
