"""Programs the agent runs to completion (git, uv, install.py, the GPU self-test, the import
check), each under the group launcher (services/supervisor/launch.py): in its own process group
that dies with the agent. A timeout, a failure, a cancel or the agent's stop ends the whole group,
children included, never just the program.

Also the blocking work those programs serve: ``run_blocking`` runs it in a daemon thread, which a
stopping agent never waits for, and ``wind_down`` ends every group the agent launched (again and
again: a retry starts a new one) until that work has given up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

from services.supervisor.launch import DEFAULT_GRACE_S, GROUP_FLAG, LAUNCH_PY, in_own_group

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a stopping agent looks for new launchers to end.
WIND_DOWN_POLL_S = 0.1
# Beyond the launcher's own grace, how long a launcher may take to exit after SIGTERM before
# the agent kills its groups itself.
LAUNCHER_SLACK_S = 1.0

_blocking: set[threading.Thread] = set()


def _kill_tree(tree: list[psutil.Process]) -> None:
    """SIGKILL every process in ``tree`` and the process groups they lead, never the agent's."""
    own_group = os.getpgrp()
    for proc in tree:
        with contextlib.suppress(OSError):
            group = os.getpgid(proc.pid)
            if group == proc.pid and group != own_group:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def end_group(proc: subprocess.Popen[Any], grace: float = DEFAULT_GRACE_S) -> None:
    """End a launcher started by ``run_in_group`` and everything under it: SIGTERM to the
    launcher (it ends the program's group and every descendant, SIGKILL after its grace); if the
    launcher itself has not exited by then, SIGKILL the launcher's group, the program's group and
    every process that was under it."""
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace + LAUNCHER_SLACK_S)
        return
    except subprocess.TimeoutExpired:
        pass
    args = list(proc.args) if isinstance(proc.args, list | tuple) else [proc.args]
    program = args[args.index("--") + 1] if "--" in args[:-1] else "?"
    log.warning("launcher did not end its group in time; killing it",
                extra={"fields": {"pid": proc.pid, "program": str(program)}})
    _kill_tree(tree + _tree(proc.pid))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def run_in_group(
    argv: list[str],
    *,
    timeout: float | None = None,
    grace: float = DEFAULT_GRACE_S,
    input: str | bytes | None = None,
    capture_output: bool = False,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run`` (never ``check``), with ``argv`` in its own process group under the
    launcher: on a timeout (subprocess.TimeoutExpired, as subprocess.run) or any exception the
    whole group is ended before this returns."""
    if capture_output:
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    # Own session for the launcher too: a terminal's Ctrl-C reaches the agent alone, which
    # stops the rest; and its group is not the agent's, so it can be killed whole.
    with subprocess.Popen(
        in_own_group(argv, grace), start_new_session=True, **popen_kwargs
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            end_group(proc, grace)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(argv, timeout or 0.0, out, err) from None
        except BaseException:
            end_group(proc, grace)
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


async def end_group_async(
    proc: asyncio.subprocess.Process, grace: float = DEFAULT_GRACE_S
) -> None:
    """``end_group`` for a launcher started with asyncio."""
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace + LAUNCHER_SLACK_S)
        return
    except TimeoutError:
        pass
    _kill_tree(tree + _tree(proc.pid))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)


async def start_in_group(
    argv: list[str], grace: float = DEFAULT_GRACE_S, **kwargs: Any
) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec`` of ``argv`` under the launcher, in its own session;
    end it with ``end_group_async``."""
    return await asyncio.create_subprocess_exec(
        *in_own_group(argv, grace), start_new_session=True, **kwargs
    )


def launched_children() -> list[psutil.Process]:
    """This process's children that are group launchers (ours and gitpython's git wrapper's)."""
    found = []
    for child in psutil.Process().children():
        try:
            cmdline = child.cmdline()
        except psutil.Error:  # gone, or a zombie not reaped yet
            continue
        if LAUNCH_PY in cmdline and GROUP_FLAG in cmdline:
            found.append(child)
    return found


async def run_blocking(fn: Callable[..., T], *args: Any, name: str) -> T:
    """``fn(*args)`` in a daemon thread. Like ``asyncio.to_thread``, but a stopping agent never
    waits for it: a cancelled await leaves the thread running, ``wind_down`` ends the groups it
    waits on, and the interpreter's exit does not join it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(exc: BaseException | None, result: Any) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        exc: BaseException | None = None
        result: Any = None
        try:
            result = fn(*args)
        except BaseException as error:  # delivered to the awaiting task
            exc = error
        finally:
            _blocking.discard(threading.current_thread())
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it
            loop.call_soon_threadsafe(deliver, exc, result)

    thread = threading.Thread(target=target, name=name, daemon=True)
    _blocking.add(thread)
    thread.start()
    return await future


def blocking_work() -> list[str]:
    """Names of the ``run_blocking`` threads still running."""
    return sorted(t.name for t in list(_blocking) if t.is_alive())


async def wind_down(deadline_s: float) -> None:
    """The agent is stopping: SIGTERM every group launcher it started (each ends its group), and
    every new one that blocking work starts (a retry), until no launcher and no blocking work is
    left or ``deadline_s`` has passed. Whatever is left then dies with the agent (parent-death
    signal)."""
    deadline = time.monotonic() + deadline_s
    signalled: set[int] = set()
    while True:
        children = launched_children()
        for child in children:
            if child.pid not in signalled:
                signalled.add(child.pid)
                with contextlib.suppress(psutil.Error):
                    child.terminate()
        busy = blocking_work()
        if not children and not busy:
            return
        if time.monotonic() > deadline:
            log.warning(
                "still running at the stop deadline; they end with the agent",
                extra={"fields": {"launchers": [c.pid for c in children], "work": busy}},
            )
            return
        await asyncio.sleep(WIND_DOWN_POLL_S)
