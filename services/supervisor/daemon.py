"""supervisord as the agent's child: write its conf, start it, stop it with everything under it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Collection
from pathlib import Path

import psutil

from config.errors import SupervisorError, WorkspaceBusy
from services.files import atomic_write_text, file_identity, open_private, unlink_if_same
from services.plan import NodePlan
from services.supervisor.conf import render_conf
from services.supervisor.head_start import AdoptedProcess, HeadStart
from services.supervisor.launch import supervisord_argv
from services.supervisor.pidfile import running_supervisord
from services.supervisor.rpc import SupervisorRpc
from services.workspace_lock import busy_message, live_owner

log = logging.getLogger(__name__)

START_DEADLINE_S = 30.0


def _kill_tree(root: psutil.Process, sig: int) -> list[psutil.Process]:
    """Send ``sig`` to ``root`` and every descendant; return them all."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    return procs


def reap_stale(plan: NodePlan, timeout: float) -> int | None:
    """Stop a supervisord left running on this workspace by an agent that died; its pid or None.

    With the parent-death signal this should not happen; this is the belt to those braces.
    Only a provably dead owner's supervisord is stale: when another live process holds the
    workspace's owner lock, its supervisord is left alone and WorkspaceBusy raised."""
    owner = live_owner(plan.workspace)
    if owner is not None:
        raise WorkspaceBusy(busy_message(plan.workspace, owner))
    proc = running_supervisord(plan.supervisor_pidfile, plan.supervisor_conf)
    if proc is None:
        return None
    pid = proc.pid
    log.warning("stopping stale supervisord", extra={"fields": {"pid": pid}})
    procs = _kill_tree(proc, signal.SIGTERM)
    for stopped in procs:  # a stopped process acts on SIGTERM only once continued
        with contextlib.suppress(psutil.NoSuchProcess):
            stopped.send_signal(signal.SIGCONT)
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for leftover in alive:
        _kill_tree(leftover, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return pid


class Supervisord:
    """The supervisord child process and its RPC client."""

    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.rpc = SupervisorRpc(plan.supervisor_socket)
        self._proc: asyncio.subprocess.Process | None = None
        self._socket: tuple[int, int] | None = None  # the RPC socket our supervisord made
        self._answering: asyncio.Future[None] | None = None  # spawn() until its RPC answers

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def output_path(self) -> Path:
        return self.plan.supervisor_output

    def prepare_dirs(self) -> None:
        """Create the 0700 run directory (sockets, conf, pidfile) and the log directory."""
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        # The sockets' directory, not only the sockets, keeps other users off the RPC.
        self.plan.run_dir.chmod(0o700)
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)

    def write_conf(self, autostart: Collection[str] = ()) -> None:
        """Write supervisord.conf atomically (readers never see half of it)."""
        self.prepare_dirs()
        atomic_write_text(
            self.plan.supervisor_conf, render_conf(self.plan, autostart), mode=0o600
        )

    async def spawn(self, autostart: Collection[str] = ()) -> None:
        """Start ``supervisord -n`` (dies with the agent), starting the ``autostart`` programs
        itself; wait_answering() then waits for its RPC."""
        await asyncio.to_thread(reap_stale, self.plan, self.plan.policy.stop_timeout + 5.0)
        self.write_conf(autostart)
        argv = supervisord_argv(self.plan.supervisor_conf)
        with open_private(self.output_path, "ab") as out:
            # Own session: a terminal's Ctrl-C reaches the agent alone, which stops the rest.
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                # Without the secrets the instances must not inherit (INSTANCE_PASS_ENV).
                env=self.plan.inherited_env(os.environ),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        log.info("supervisord started", extra={"fields": {
            "pid": self._proc.pid, "starts_at_once": list(autostart)}})
        # Asked from now on, not when the boot gets to it: the boot waits on it.
        self._answering = asyncio.ensure_future(self._until_answering())

    def adopt(self, head: HeadStart) -> None:
        """Take over the supervisord a head start launched from this very plan's conf (the boot
        checked that); wait_answering() then waits for its RPC."""
        self._proc = AdoptedProcess(head.proc)  # type: ignore[assignment]
        head.adopted = True
        log.info(
            "supervisord adopted from the head start", extra={"fields": {"pid": head.proc.pid}}
        )
        self._answering = asyncio.ensure_future(self._until_answering())

    async def wait_answering(self) -> None:
        """Until the spawned supervisord's RPC answers; SupervisorError (supervisord stopped)
        if it exits or stays silent for START_DEADLINE_S."""
        assert self._answering is not None, "spawn() first"
        try:
            await self._answering
        except SupervisorError:
            await self.stop()
            raise

    async def _until_answering(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self._proc.returncode is not None:
                raise SupervisorError(
                    f"supervisord exited with code {self._proc.returncode} at start: "
                    f"{self._output_tail()}"
                )
            with contextlib.suppress(SupervisorError):
                if await self.rpc.state() == "RUNNING":
                    self._socket = file_identity(self.plan.supervisor_socket)
                    return
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"supervisord did not answer on {self.plan.supervisor_socket} within "
                    f"{START_DEADLINE_S:.0f}s: {self._output_tail()}"
                )
            await asyncio.sleep(0.05)

    def remove_socket(self) -> None:
        """Remove the RPC socket if it is still the one our supervisord created (a supervisord
        that was killed leaves it behind); never a socket of another agent's supervisord."""
        unlink_if_same(self.plan.supervisor_socket, self._socket)
        self._socket = None

    def _output_tail(self) -> str:
        try:
            lines = self.output_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        return " | ".join(lines[-5:]) or "(no output)"

    async def wait(self) -> int:
        """Until supervisord exits; its return code."""
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM supervisord (it stops every program as a group); kill what outlives the wait."""
        answering = self._answering
        if answering is not None:
            if not answering.done():
                answering.cancel()
            elif not answering.cancelled():
                answering.exception()  # seen: a failed start is this stop's reason, not a bug
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        # supervisord waits stopwaitsecs per program before its own SIGKILL; allow for that.
        grace = self.plan.policy.stop_timeout + 3.0
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.error(
                "supervisord did not stop in time; killing its process tree",
                extra={"fields": {"grace_s": grace}},
            )
        # Last resort, also for children that escaped their process group.
        survivors = [p for p in tree if p.is_running()]
        for leftover in survivors:
            _kill_tree(leftover, signal.SIGKILL)
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
