"""One workspace, one owner: an exclusive ``flock`` on ``<workspace>/run/owner.lock``.

The commands that write a workspace (up, demo, install, models) hold it for their whole run;
a second one on the same workspace fails at once, naming the owner. The lock is the kernel's,
tied to the owner's open file: it is gone the moment the owner dies, however it died (SIGKILL,
OOM), so "the lock can be taken" proves that a previous owner is dead. The descriptor is
close-on-exec, so no child (git, uv, supervisord, the instances) holds it: orphans of a killed
agent never keep its workspace locked. The file is never deleted (deleting a lock file lets
two processes lock two different files); its text, written after the lock is taken, names the
owner for the error message and for people (``cat run/owner.lock``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from config.errors import ConfigError, Problem, WorkspaceBusy

LOCK_NAME = "owner.lock"
# The owner writes its details right after locking; a reader that races that write re-reads.
OWNER_WRITE_WAIT_S = 1.0

# Locks this process holds, by the lock file's real path: the same process asking again (or
# asking whether another owner lives) must not trip over its own lock.
_held: dict[str, WorkspaceLock] = {}


def lock_path(workspace: Path) -> Path:
    return workspace / "run" / LOCK_NAME


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _try_lock(path: Path) -> int | None:
    """An open, exclusively locked descriptor of ``path`` (close-on-exec); None if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_owner(path: Path) -> dict[str, Any]:
    """The owner's details as written in the lock file; {} when absent or unreadable."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _live_owner(path: Path) -> dict[str, Any]:
    """The details of the process holding ``path``, waiting briefly for them to appear (a new
    owner writes them just after locking; until then the file may name a dead one). A pid
    that is not alive here is still named after the wait: the owner may live in another
    container sharing the volume (the host it wrote says which)."""
    deadline = time.monotonic() + OWNER_WRITE_WAIT_S
    while True:
        owner = read_owner(path)
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid):
            return owner
        if time.monotonic() > deadline:
            return owner if isinstance(pid, int) else {}
        time.sleep(0.05)


def busy_message(workspace: Path, owner: dict[str, Any]) -> str:
    path = lock_path(workspace)
    if not owner:
        who = "another process (it has not written its details yet)"
        fix = "stop that comfy-machine first"
    else:
        pid = owner["pid"]
        who = f"pid {pid} ({owner.get('cmdline') or owner.get('command') or '?'}"
        if owner.get("started_at"):
            who += f", since {owner['started_at']}"
        if owner.get("host") and owner["host"] != socket.gethostname():
            who += f", on host {owner['host']}"
        who += ")"
        fix = f"stop it first (kill -TERM {pid}, then wait for it to exit)"
    return (
        f"workspace {workspace} is in use by {who}; one workspace has one owner "
        f"(lock {path}): {fix}, or use another MACHINE_WORKSPACE"
    )


class WorkspaceLock:
    """A held owner lock; ``release`` (or process exit, however it happens) frees it."""

    def __init__(self, workspace: Path, fd: int) -> None:
        self.workspace = workspace
        self.path = lock_path(workspace)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        _held.pop(_key(self.path), None)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # before unlocking: never a new owner's text
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None

    def __enter__(self) -> WorkspaceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(workspace: Path, command: str, source: str = "MACHINE_WORKSPACE") -> WorkspaceLock:
    """Take ``workspace``'s owner lock for this process before anything in it is touched.

    Raises WorkspaceBusy (exit 2) naming the live owner, or ConfigError when the workspace
    cannot hold the lock at all (a file in the way, read-only). This process asking again
    gets the lock it holds (a warm boot's head start takes it before `up` reads its settings)."""
    path = lock_path(workspace)
    held = _held.get(_key(path))
    if held is not None and held.held:
        return held
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = _try_lock(path)
    except OSError as exc:
        raise ConfigError([Problem(
            source, repr(str(workspace)),
            f"cannot create or open the owner lock {path} ({exc.strerror or exc}); use a "
            "directory this user can write",
        )]) from None
    if fd is None:
        raise WorkspaceBusy(busy_message(workspace, _live_owner(path)))
    lock = WorkspaceLock(workspace, fd)
    try:
        me = psutil.Process()
        details = {
            "pid": os.getpid(),
            "command": command,
            "cmdline": " ".join(me.cmdline()),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(me.create_time())),
            "host": socket.gethostname(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    except BaseException:
        lock.release()
        raise
    _held[_key(path)] = lock
    return lock


def live_owner(workspace: Path) -> dict[str, Any] | None:
    """None when no other live process owns ``workspace`` (this process holds its lock, or the
    lock can be taken: any previous owner is dead); else that owner's details ({} if unknown).

    Never creates the workspace or its run directory (without them there is no owner)."""
    path = lock_path(workspace)
    if _key(path) in _held or not path.parent.is_dir():
        return None
    try:
        fd = _try_lock(path)
    except OSError:
        return None  # it cannot be opened for writing, so nobody holds it through this path
    if fd is None:
        return _live_owner(path)
    os.close(fd)  # taken only to look: released at once
    return None
