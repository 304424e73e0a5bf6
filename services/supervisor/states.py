"""supervisord's process states: our vocabulary for an instance's process (supervisor.states)."""

from __future__ import annotations

from enum import IntEnum


class ProcessState(IntEnum):
    STOPPED = 0
    STARTING = 10
    RUNNING = 20
    BACKOFF = 30
    STOPPING = 40
    EXITED = 100
    FATAL = 200
    UNKNOWN = 1000

    @classmethod
    def from_name(cls, name: str) -> ProcessState:
        """Convert a state name from XML-RPC or an event payload; unknown names map to UNKNOWN."""
        return cls.__members__.get(name, cls.UNKNOWN)


# The process is up or coming up: it has a pid the agent probes (unless it has just died).
UP_STATES = frozenset({ProcessState.STARTING, ProcessState.RUNNING})
# The process has exited (supervisord may still start it again).
EXITED_STATES = frozenset({ProcessState.EXITED, ProcessState.BACKOFF, ProcessState.FATAL})
# A STARTING that follows one of these is a restart, not the first start.
RESTART_FROM_STATES = frozenset({ProcessState.EXITED, ProcessState.BACKOFF})


class Fault(IntEnum):
    """supervisor.xmlrpc.Faults codes we act on."""

    BAD_NAME = 10
    NOT_RUNNING = 70
    ALREADY_STARTED = 60
    SPAWN_ERROR = 50
    ABNORMAL_TERMINATION = 40
    SHUTDOWN_STATE = 6
