"""supervisord with logging a full disk cannot kill: ``python -m services.supervisor.supervisord
--die-with AGENT_PID -n -c CONF`` is supervisord itself, its log handlers made to drop what they
cannot write, and dying with the agent: ``--die-with`` sets the parent-death signal (SIGTERM, so
supervisord stops its programs as usual even when the agent is SIGKILLed) before supervisord
starts, with no launcher process in front (one Python start less on a warm boot's path).

Why (supervisor 4.x, supervisor/loggers.py): ``Handler.emit`` catches a failed write and calls
``handleError``, which prints the traceback to supervisord's stderr, unguarded: when that cannot
be written either (a full disk), the exception escapes into supervisord's main loop (a process's
exit is logged from ``reap()``, outside any guard) and supervisord dies, taking the healthy
instances with it. And ``RotatingFileHandler.doRollover`` runs outside ``emit``'s guard: on a full
disk at a rollover, closing the file raises, and the closed file is written again at each record
after, which closes that instance's output channel for good.

So, here: a failed write drops the record and is noted once on stderr (a raw write whose failure
is ignored) until a write succeeds again; a failed rollover is dropped as well, and a handler
whose file was closed under it reopens the file at the next record. Nothing else changes:
supervisord's own log stays in ``<workspace>/logs/supervisord.log`` and the instances' logs stay
rotated by size, and writing resumes by itself once the disk has space."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from supervisor import loggers

from services.supervisor.launch import DIE_WITH_FLAG, set_parent_death_signal

_PATCHED = "_comfy_machine_patched"


def _note(text: str) -> None:
    with contextlib.suppress(OSError):  # stderr may be on the full disk too
        os.write(2, text.encode(errors="replace"))


def _name(handler: Any) -> str:
    return str(getattr(handler, "baseFilename", None) or "a log")


def _handle_error(self: Any) -> None:
    """Instead of printing a traceback (which may fail and escape): note the first failure."""
    if not getattr(self, "_failing", False):
        self._failing = True
        _note(f"supervisord: cannot write {_name(self)}: {sys.exc_info()[1]!r}; "
              "its records are dropped until it can\n")


def patch_loggers() -> None:
    """Make supervisord's log handlers unable to raise out of a log call (idempotent)."""
    if getattr(loggers, _PATCHED, False):
        return
    flush = loggers.Handler.flush

    def handler_flush(self: Any) -> None:
        flush(self)  # a failure raises into emit's guard, which calls handleError
        if getattr(self, "_failing", False):
            self._failing = False
            _note(f"supervisord: writing {_name(self)} again\n")

    def rotating_emit(self: Any, record: Any) -> None:
        if self.stream.closed and not self.closed:  # closed by a rollover that failed
            try:
                self.stream = open(self.baseFilename, self.mode)  # noqa: SIM115
            except OSError:
                self.handleError()
                return
        loggers.FileHandler.emit(self, record)
        try:
            self.doRollover()
        except (OSError, ValueError):
            self.handleError()

    loggers.Handler.handleError = _handle_error  # type: ignore[method-assign]
    loggers.Handler.flush = handler_flush  # type: ignore[method-assign]
    loggers.RotatingFileHandler.emit = rotating_emit  # type: ignore[method-assign]
    setattr(loggers, _PATCHED, True)


def start_programs_at_once() -> None:
    """supervisord starts its autostart programs after its main loop's first poll, which waits
    up to 1 s for a socket to wake it: make that first poll return at once, so the instances
    start as soon as supervisord is up, whether or not the agent has asked it anything yet (a
    warm boot starts supervisord before the agent has even read its settings: issue 14)."""
    from supervisor import poller

    cls = poller.Poller
    if getattr(cls, _PATCHED, False):
        return
    poll = cls.poll

    def first_poll_at_once(self: Any, timeout: float) -> Any:
        if not getattr(self, "_polled", False):
            self._polled = True
            timeout = 0
        return poll(self, timeout)

    cls.poll = first_poll_at_once
    setattr(cls, _PATCHED, True)


# The logs supervisord creates (its own, every instance's) are 0640; each program sets its own
# umask (conf.py). Set here, not by the agent's spawn: uvloop's subprocess_exec has no umask=.
SUPERVISORD_UMASK = 0o027


def die_with_parent(argv: list[str]) -> None:
    """Take ``--die-with PID`` out of ``argv``: SIGTERM when that parent dies; exit at once if
    it is gone already (it may die before the signal is set: then nobody would stop us)."""
    if DIE_WITH_FLAG not in argv:
        return
    at = argv.index(DIE_WITH_FLAG)
    parent = int(argv[at + 1])
    del argv[at : at + 2]
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)
    # A shell's background job starts with SIGINT ignored; ignored signals survive exec and
    # supervisord's children (ComfyUI stops cleanly only on SIGINT) would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> None:
    die_with_parent(sys.argv)
    os.umask(SUPERVISORD_UMASK)
    patch_loggers()
    start_programs_at_once()
    from supervisor.supervisord import main as supervisord_main

    supervisord_main()


if __name__ == "__main__":
    main()
