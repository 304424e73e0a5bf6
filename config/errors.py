"""The MachineError family: every error a user can see says what went wrong and what to do."""

from __future__ import annotations

from typing import NamedTuple


# A NamedTuple, not a dataclass: importing dataclasses (and inspect with it) is ~10 ms of a CLI
# command that only asks a running node for its health and should answer in 150 ms (issue 14).
class Problem(NamedTuple):
    """One bad input: where it came from, what was given, what is accepted."""

    source: str  # the env variable or TOML key (with file) the value came from
    given: str
    message: str  # what is wrong and what is accepted / how to fix it

    def __str__(self) -> str:
        return f"{self.source}={self.given}: {self.message}"


class MachineError(Exception):
    """Base of all errors comfy-machine reports to users; the message says what to do."""

    exit_code = 1


class ConfigError(MachineError):
    """Settings are invalid; carries one Problem per bad input."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class GpuError(MachineError):
    """GPU discovery failed (no driver, NVML error, fewer GPUs than asked)."""

    exit_code = 2


class InstallError(MachineError):
    """Installing ComfyUI or a custom node failed. ``transient``: a network failure (clone,
    fetch, a registry download) that outlived its own retries; the boot retries the install
    phase for it (INSTALL_RETRIES). Permanent (the default): a missing ref, a conflict, a bad
    requirement, which no retry fixes."""

    def __init__(self, message: str = "", transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class DiskFullError(MachineError):
    """Not enough free disk: too little before starting (the numbers are in the message) or
    the disk filled up while writing (ENOSPC)."""


class SupervisorError(MachineError):
    """supervisord could not be started or did not answer."""


class LogFileRefused(MachineError):
    """An instance log path that is not a regular file (a symlink, a FIFO): never read."""


class HealthClientError(MachineError):
    """The health server of a running node could not be reached or answered oddly."""


class WorkspaceBusy(MachineError):
    """Another live comfy-machine process owns the workspace (holds its owner lock)."""

    exit_code = 2
