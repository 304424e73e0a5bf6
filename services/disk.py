"""The workspace disk's free space, checked by the agent every few seconds into MachineState.

A full workspace (instance logs, outputs, the lock) is reported, never a crash: health gives the
reason and degrades the node while instances serve, /metrics has the free bytes, and the node
recovers by itself when space returns."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from services.state import MachineState

log = logging.getLogger(__name__)

# Below this the workspace counts as full: a log line, a smoke image or the lock may not fit.
FULL_BELOW_BYTES = 16 * 2**20
CHECK_INTERVAL_S = 2.0


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (for an unprivileged writer); None if unknown."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_full(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < FULL_BELOW_BYTES


def check_workspace(state: MachineState, workspace: Path) -> None:
    """Record the workspace's free space; log and wake health waiters when it fills or frees."""
    free = free_bytes(workspace)
    full = free is not None and free < FULL_BELOW_BYTES
    was_full = state.workspace_full
    state.workspace_free_bytes = free
    state.workspace_full = full
    if full == was_full:
        return
    fields = {"workspace": str(workspace), "free_bytes": free}
    if full:
        log.error("workspace disk full: instance logs and outputs cannot be written",
                  extra={"fields": fields})
    else:
        log.info("workspace disk has space again", extra={"fields": fields})
    state.changed()


async def watch_workspace(
    state: MachineState, workspace: Path, interval: float = CHECK_INTERVAL_S
) -> None:
    """Check the workspace disk every ``interval`` seconds until cancelled."""
    state.workspace_path = str(workspace)
    while True:
        check_workspace(state, workspace)
        await asyncio.sleep(interval)
