"""The boot sequence: plan, health server, install, start supervised instances, run, stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from config.errors import InstallError, MachineError
from config.settings import Settings
from health.checks import node_report
from health.limits import HealthLimits
from health.server import start_health_server
from machine.warm_start import (
    Launched,
    install_inputs,
    launch,
    leave_head_start,
    new_state,
    stop_launched,
    warm_launch,
)
from services.disk import watch_workspace
from services.drain import drain
from services.fdlimit import raise_fd_limit
from services.install.git_launcher import use_group_git
from services.install.installer import (
    Installer,
    InstallReport,
    StepCallback,
    node_state,
)
from services.instances import InstanceController
from services.models.step import fetch_background, models_step
from services.operator import OperatorActions
from services.plan import NodePlan
from services.probes import InstanceProber, ProbeSettings
from services.process_group import run_blocking, wind_down
from services.proxy.probe import ProxyProber
from services.state import (
    MachineState,
    NodeStatus,
    Phase,
    StepStatus,
)
from services.supervisor.launch import DEFAULT_GRACE_S, refuse_launches

log = logging.getLogger(__name__)

# At a stop: how long the groups the boot started (and new ones its retries start) are ended
# before the agent exits anyway, and how long its exit may then take before it is forced.
WIND_DOWN_S = DEFAULT_GRACE_S + 2.0
# The install phase's retries after a transient failure (INSTALL_RETRIES): 5 s, doubling.
INSTALL_BACKOFF_S = 5.0
INSTALL_BACKOFF_MAX_S = 60.0
EXIT_GRACE_S = 3.0


def record_step(state: MachineState) -> StepCallback:
    """A step callback, safe to call from the installer's thread, that updates ``state``."""
    loop = asyncio.get_running_loop()

    def apply(name: str, status: StepStatus, detail: str, error: str | None,
              duration: float | None) -> None:
        step = state.step(name)
        step.status, step.detail, step.error = status, detail, error
        if status is StepStatus.RUNNING or step.started_at is None:
            step.started_at = time.time()
        if duration is not None:
            step.duration_s = round(duration, 3)
        log.log(logging.ERROR if error else logging.INFO, "install step", extra={"fields": {
            "step": name, "status": status.value, "detail": detail, "error": error,
            "duration_s": step.duration_s}})
        state.changed()

    return lambda *args: loop.call_soon_threadsafe(apply, *args)


def _run_installer(installer: Installer, run_dir: Path, verify_only: bool) -> InstallReport | None:
    report = installer.verify()
    if report is not None or verify_only:
        return report
    # gitpython's git through the group launcher: a killed agent leaves no git behind.
    use_group_git(run_dir)
    return installer.install()


async def _install(settings: Settings, plan: NodePlan, state: MachineState) -> None:
    """The install phase, retried with backoff (INSTALL_RETRIES) while what failed is
    transient (a network failure that outlived git's or the registry's own retries: an
    InstallError or a custom node marked ``transient``); a permanent failure stays at once."""
    state.set_phase(Phase.INSTALLING)
    attempts = settings.install_retries + 1
    for attempt in range(1, attempts + 1):
        state.install_attempts = attempt
        try:
            await _install_once(settings, plan, state)
        except InstallError as exc:
            if not exc.transient or attempt == attempts:
                raise
            error = str(exc)
        else:
            failed = [n for n in state.custom_nodes.values()
                      if n.status is NodeStatus.FAILED and n.transient]
            if not failed or attempt == attempts:
                return
            error = "; ".join(f"custom node {n.name}: {n.error}" for n in failed)
        delay = min(INSTALL_BACKOFF_S * 2 ** (attempt - 1), INSTALL_BACKOFF_MAX_S)
        state.install_retry_error = error
        state.install_next_attempt_at = time.time() + delay
        state.changed()
        log.warning("install retry", extra={"fields": {
            "attempt": attempt, "of": attempts, "delay_s": delay, "error": error}})
        await asyncio.sleep(delay)
        state.install_next_attempt_at = None


async def _install_once(
    settings: Settings, plan: NodePlan, state: MachineState, verify_only: bool = False
) -> bool:
    """Verify, and unless ``verify_only`` install, what the inputs ask for; False when only
    verifying found something to install."""
    installer = Installer(install_inputs(settings), record_step(state))
    # Listed while installing; the installer's own records replace these when it is done.
    state.custom_nodes = {
        n.name: node_state(n, NodeStatus.PENDING if n.enabled else NodeStatus.DISABLED)
        for n in installer.inputs.nodes
    }
    # A daemon thread: a stop cancels this await and ends the groups the thread waits on
    # (wind_down); the agent's exit never waits for it.
    report = await run_blocking(
        _run_installer, installer, plan.run_dir, verify_only, name="install"
    )
    if report is None:
        return False
    state.custom_nodes = {node.name: node for node in report.nodes}
    if not (settings.install_path / "main.py").is_file():
        raise InstallError(f"ComfyUI: {installer.inputs.comfyui_url}@{settings.comfyui_ref} has no "
                           "main.py; COMFYUI_REPO must be a ComfyUI repository")
    state.changed()
    return True


async def _notify_when_ready(state: MachineState, on_ready: Callable[[], None]) -> None:
    while node_report(state, time.time())[1]["status"] != "ready":
        await state.wait_changed(1.0)
    on_ready()


def health_limits(settings: Settings) -> HealthLimits:
    """Raise the open-files limit to the hard one, and bound the health port's connections to
    MACHINE_HEALTH_MAX_CONNECTIONS and to what the limit leaves after the agent's reserve, so a
    flood of clients can never take the descriptors supervisord's XML-RPC and probes need."""
    fds = raise_fd_limit()
    cap = fds.connection_cap(settings.machine_health_max_connections)
    fields = {"open_files_limit": fds.soft, "hard_limit": fds.hard, "reserve": fds.reserve,
              "max_connections": cap, "idle_timeout_s": settings.machine_health_idle_timeout}
    if cap < settings.machine_health_max_connections:
        log.warning("health connections capped below MACHINE_HEALTH_MAX_CONNECTIONS by the "
                    "open-files limit; raise `ulimit -n` (the hard limit) to allow more",
                    extra={"fields": fields})
    else:
        log.info("health limits", extra={"fields": fields})
    return HealthLimits(
        idle_timeout=settings.machine_health_idle_timeout, max_connections=cap
    )


async def run_node(
    settings: Settings,
    plan: NodePlan,
    stop: asyncio.Event,
    on_ready: Callable[[], None] | None = None,
    stop_now: asyncio.Event | None = None,
    state: MachineState | None = None,
    launched: asyncio.Future[Launched] | None = None,
) -> int:
    """Boot, serve and supervise until ``stop`` is set; then drain (no new work; running and
    queued prompts finish, up to DRAIN_TIMEOUT, or until ``stop_now`` is set) and stop
    everything. Exit code. ``state`` and ``launched``: a warm start already under way
    (machine/warm_start.py); without them, run_node begins it."""
    stop_now = stop_now if stop_now is not None else asyncio.Event()
    limits = health_limits(settings)
    if state is None:
        state = new_state(settings, plan)
        launched = warm_launch(settings, plan, state)
    token = settings.machine_health_token
    actions = OperatorActions(settings, plan, state)  # the controller joins once it runs
    try:
        runner = await start_health_server(
            state, plan.health_listen, plan.health_port, limits,
            token.get_secret_value() if token else None, actions,
        )
    except OSError as exc:
        await stop_launched(None, launched)
        raise MachineError(
            f"MACHINE_HEALTH_PORT={plan.health_port}: cannot serve health on "
            f"{plan.health_listen}:{plan.health_port} ({exc.strerror}); free the port or "
            "choose another MACHINE_HEALTH_PORT"
        ) from None
    log.info(
        "health server",
        extra={"fields": {"url": f"http://{plan.health_listen}:{plan.health_port}/health/comfyui"}},
    )
    controller: InstanceController | None = None
    tasks: list[asyncio.Task[None]] = []
    code = 0
    disk_watch = asyncio.create_task(
        watch_workspace(state, settings.machine_workspace), name="workspace-disk"
    )
    try:
        stop_wait = asyncio.ensure_future(stop.wait())
        boot = asyncio.ensure_future(_boot(settings, plan, state, launched))
        await asyncio.wait({stop_wait, boot}, return_when=asyncio.FIRST_COMPLETED)
        if not boot.done():
            boot.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            controller, tasks = await boot
        if on_ready is not None and controller is not None:
            tasks.append(asyncio.create_task(_notify_when_ready(state, on_ready), name="ready"))
        if controller is not None:
            actions.controller = controller
            tasks.append(asyncio.create_task(controller.run(), name="reconcile"))
            code = await _supervise(tasks, stop_wait, state)
            if code == 0 and not stop_now.is_set():
                await drain(state, settings.drain_timeout, stop_now, settings.probe_timeout)
        else:
            await stop_wait  # failed boot: keep health up so operators can read why
        stop_wait.cancel()
    finally:
        # Work the boot no longer waits for (the install thread, a retry loop) starts no new
        # git, uv or install.py: it fails at once instead.
        refuse_launches("the node is stopping")
        if state.phase is not Phase.FAILED:
            state.set_phase(Phase.STOPPING)
        log.info("stopping", extra={"fields": {"phase": state.phase.value}})
        for task in [*tasks, disk_watch]:
            task.cancel()
        await asyncio.gather(*tasks, disk_watch, return_exceptions=True)
        # What the boot was running (git, uv, install.py) ends with its whole process group,
        # while supervisord stops the instances.
        await asyncio.gather(wind_down(WIND_DOWN_S), stop_launched(controller, launched))
        await runner.cleanup()
        log.info("stopped")
    return code


def exit_if_stuck(code: int, grace: float = EXIT_GRACE_S) -> None:
    """Call once the orderly stop is done: if the process has not exited ``grace`` seconds
    later (a thread blocked in a call nothing interrupts keeps asyncio's executor shutdown or
    the interpreter's exit waiting), exit with ``code`` anyway. Everything the agent started is
    stopped by then, and whatever a stuck thread starts dies with the agent."""

    def watchdog() -> None:
        time.sleep(grace)
        stuck = [t.name for t in threading.enumerate()
                 if t is not threading.main_thread() and t is not threading.current_thread()]
        log.warning("exiting although threads are still blocked",
                    extra={"fields": {"threads": stuck, "code": code}})
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


async def _supervise(
    tasks: list[asyncio.Task[None]], stop_wait: asyncio.Future[bool], state: MachineState
) -> int:
    """Until stop: every background task is watched; one that dies (supervisord gone, a bug
    in a prober or the sampler) fails the node loudly instead of leaving it half-served."""
    watched: set[asyncio.Future[object]] = {stop_wait, *tasks}
    while not stop_wait.done():
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop_wait}:
            watched.discard(task)
            if task.cancelled() or task.exception() is None:
                continue  # finished its job (e.g. the ready notice)
            exc = task.exception()
            log.error("background task failed", exc_info=exc,
                      extra={"fields": {"task": task.get_name(), "error": str(exc)}})
            state.set_phase(Phase.FAILED, f"{task.get_name()}: {exc}", task.get_name())
            return 1
    return 0


async def _boot(
    settings: Settings,
    plan: NodePlan,
    state: MachineState,
    launched: asyncio.Future[Launched] | None = None,
) -> tuple[InstanceController | None, list[asyncio.Task[None]]]:
    """INSTALLING -> DOWNLOADING -> STARTING; on failure set FAILED and return no controller.

    A warm boot (``launched``: run_node started the instances first, see warm_launch)
    verifies the installation while they start. If what is on disk no longer matches the lock,
    the instances are stopped and the install runs as on a cold boot. Nothing is probed (so
    nothing reported ready) before the boot is done."""
    controller: InstanceController | None = None
    try:
        if launched is not None:
            state.set_phase(Phase.INSTALLING)
            verified = await _install_once(settings, plan, state, verify_only=True)
            controller, sampler = await launched
            await controller.attach()
            if not verified:
                log.warning("warm start: the installation no longer matches its lock; stopping "
                            "the instances to install")
                await controller.stop_instances()
                await _install(settings, plan, state)
        elif plan.instances:
            await _install(settings, plan, state)
        await asyncio.to_thread(leave_head_start, settings, plan)
        state.set_phase(Phase.DOWNLOADING)
        fetcher = await models_step(
            settings, state, plan.extra_model_paths, plan.extra_model_paths_yaml
        )
        state.set_phase(Phase.STARTING)
        if controller is None:
            controller, sampler = await launch(settings, plan, state, start_now=False)
    except Exception as exc:
        # Whatever got started (supervisord, the instances) must not outlive the boot.
        await asyncio.shield(stop_launched(controller, launched))
        return _boot_failed(settings, state, exc)
    except asyncio.CancelledError:
        await asyncio.shield(stop_launched(controller, launched))
        raise
    session = aiohttp.ClientSession()
    probe_settings = ProbeSettings(
        interval=settings.probe_interval,
        timeout=settings.probe_timeout,
        smoke_timeout=settings.smoke_timeout,
        access_token=settings.comfyui_access_token,
    )
    tasks = [
        asyncio.create_task(
            InstanceProber(state, inst, session, probe_settings, plan.output_dir).run(),
            name=f"probe-{inst.plan.name}",
        )
        for inst in state.instances.values()
    ]
    if state.proxy is not None:
        prober = ProxyProber(
            state, state.proxy, session, settings.probe_interval, settings.probe_timeout
        )
        tasks.append(asyncio.create_task(prober.run(), name="probe-proxy"))
    tasks.append(asyncio.create_task(_close_on_cancel(session), name="http-session"))
    tasks.append(asyncio.create_task(fetch_background(fetcher), name="models-background"))
    if sampler is not None:
        tasks.append(asyncio.create_task(sampler.run(), name="gpu-sampler"))
    state.set_phase(Phase.RUNNING)
    return controller, tasks


def _boot_failed(
    settings: Settings, state: MachineState, exc: Exception
) -> tuple[InstanceController | None, list[asyncio.Task[None]]]:
    """FAILED with the reason: bad input, a full disk (the operator's to fix), or a bug."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = (f"disk full: {exc}; free space in {settings.machine_workspace} "
                  "(or use a larger volume) and restart the node")
    elif isinstance(exc, MachineError):
        reason = str(exc)
    else:
        return _boot_crashed(state, exc)
    log.error("boot failed", extra={"fields": {"phase": state.phase.value, "error": reason}})
    state.set_phase(Phase.FAILED, reason, state.phase.value.lower())
    return None, []


def _boot_crashed(
    state: MachineState, exc: Exception
) -> tuple[InstanceController | None, list[asyncio.Task[None]]]:
    """A bug, not bad input: keep the node up and say what broke."""
    log.error("boot failed unexpectedly", exc_info=exc,
              extra={"fields": {"phase": state.phase.value}})
    state.set_phase(
        Phase.FAILED, f"internal error: {type(exc).__name__}: {exc}", state.phase.value.lower()
    )
    return None, []


async def _close_on_cancel(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
