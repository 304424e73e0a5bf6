"""Exec a program that dies with its parent: ``python -m services.supervisor.launch PPID -- argv``.

Sets the Linux parent-death signal (prctl PR_SET_PDEATHSIG, kept across execve) so that if the
agent is SIGKILLed, supervisord gets SIGTERM and stops its programs as usual. Used instead of
``preexec_fn``, which is unsafe in a threaded parent."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies; False where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def dies_with_us(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the program gets SIGTERM if this process dies (even by SIGKILL)."""
    return [sys.executable, "-m", "services.supervisor.launch", str(os.getpid()), "--", *argv]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print(
            "usage: python -m services.supervisor.launch PARENT_PID -- PROGRAM [ARGS...]",
            file=sys.stderr,
        )
        return 2
    parent, program = int(args[0]), args[2:]
    set_parent_death_signal()
    # The parent may have died before prctl took effect: then nobody would stop us.
    if os.getppid() != parent:
        return 1
    # A shell's background job starts with SIGINT ignored; ignored signals survive exec and
    # supervisord's children (ComfyUI stops cleanly only on SIGINT) would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvp(program[0], program)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
