"""Which supervisord runs on a workspace: the one its pidfile names, if that process runs with
the workspace's supervisord.conf (a pid alone may have been reused by anything)."""

from __future__ import annotations

from pathlib import Path

import psutil


def running_supervisord(pidfile: Path, conf: Path) -> psutil.Process | None:
    """The live supervisord started with ``conf`` that ``pidfile`` names; None otherwise."""
    try:
        proc = psutil.Process(int(pidfile.read_text().strip()))
        return proc if str(conf) in proc.cmdline() else None
    except (OSError, ValueError, psutil.Error):
        return None
