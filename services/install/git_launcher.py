"""gitpython's git through the group launcher, without touching the checkout code (git.py): a
wrapper script gitpython is pointed at with ``git.refresh``. Every git command gitpython runs, and
whatever git starts (``git-remote-http``, ssh, credential helpers), then runs in its own process
group, killed whole when the agent dies (even by SIGKILL), when the launcher gets SIGTERM, and
when git exits leaving something behind.

For code that bounds git commands: the pid gitpython's Popen holds is the launcher's, and the
launcher shares the agent's process group (gitpython starts no new session), so never
``os.killpg`` it. ``kill_after_timeout`` (SIGKILL to that pid and every descendant) or a SIGTERM
to that pid (the launcher ends git's group, SIGKILL after its grace) ends git and its children."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from services.files import atomic_write_text
from services.supervisor.launch import DEFAULT_GRACE_S, GROUP_FLAG, LAUNCH_PY

log = logging.getLogger(__name__)

WRAPPER_NAME = "git"


def real_git() -> str | None:
    """The git gitpython would run without us: GIT_PYTHON_GIT_EXECUTABLE or git on PATH."""
    return shutil.which(os.environ.get("GIT_PYTHON_GIT_EXECUTABLE") or "git")


def wrapper_text(git_path: str, grace: float = DEFAULT_GRACE_S) -> str:
    """A shell script running ``git_path`` under the group launcher, the caller as its parent."""
    launcher = shlex.join([sys.executable, "-I", "-S", LAUNCH_PY, GROUP_FLAG, "--grace",
                           f"{grace:g}"])
    return (
        "#!/bin/sh\n"
        "# Written by comfy-machine: gitpython's git in its own process group (see\n"
        "# services/supervisor/launch.py). Rewritten at every install.\n"
        f'exec {launcher} "$PPID" -- {shlex.quote(git_path)} "$@"\n'
    )


def use_group_git(directory: Path) -> Path | None:
    """Write the wrapper into ``directory`` and point gitpython at it; its path. None, with a
    warning, when it cannot be written or run there (a full or noexec workspace): gitpython then
    keeps running git directly, as before."""
    target = real_git()
    if target is None:
        return None  # no git at all: the checkout itself reports it
    import git  # gitpython, for the install path alone: a warm boot never loads it

    path = directory / WRAPPER_NAME
    try:
        if str(path) != git.Git.GIT_PYTHON_GIT_EXECUTABLE or not path.exists():
            atomic_write_text(path, wrapper_text(target), mode=0o700)
            git.refresh(str(path))
    except (OSError, git.GitCommandNotFound, ImportError) as exc:
        log.warning(
            "git runs without the group launcher: a killed agent may leave a git command behind",
            extra={"fields": {"wrapper": str(path), "error": str(exc)}},
        )
        return None
    return path
