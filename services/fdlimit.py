"""The agent's file-descriptor budget: raise the soft RLIMIT_NOFILE to the hard limit at start
and keep a reserve below it for the agent's own work (supervisord XML-RPC, probes, pidfds,
log files, downloads), so that clients of the health port can never use it all up."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Descriptors the agent keeps for itself whatever the health port is asked to hold: a
# supervisord RPC per worker thread, two probe connections and a pidfd per instance, log and
# model files, NVML, git/uv pipes while installing. Generous: a few hundred is the usual need.
FD_RESERVE = 512
NR_OPEN = Path("/proc/sys/fs/nr_open")
FALLBACK_NR_OPEN = 1 << 20


@dataclass(frozen=True)
class FdBudget:
    """The limit the agent runs under (after raising it) and what it keeps for itself."""

    soft: int
    hard: int

    @property
    def reserve(self) -> int:
        # A tiny limit (a misconfigured container) still leaves half for the agent itself.
        return min(FD_RESERVE, self.soft // 2)

    def connection_cap(self, requested: int) -> int:
        """Health connections allowed: ``requested``, but always below the soft limit minus
        the reserve (each connection holds one descriptor)."""
        return max(1, min(requested, self.soft - self.reserve))


def _kernel_max() -> int:
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return FALLBACK_NR_OPEN


def raise_fd_limit() -> FdBudget:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the kernel's nr_open when unlimited);
    on failure keep the current one. Children (supervisord, ComfyUI) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _kernel_max() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit", extra={"fields": {
                "soft": soft, "hard": hard, "error": str(exc)}})
        else:
            soft = target
    if soft == resource.RLIM_INFINITY:
        soft = _kernel_max()
    return FdBudget(soft=soft, hard=hard)
