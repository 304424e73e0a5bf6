"""Run a program that dies with its parent, with everything it starts. Linux-only and standard
library only (the launcher starts for every git, uv and install.py call, so it starts fast:
``python -I -S``). supervisord sets its own parent-death signal instead
(services/supervisor/supervisord.py, ``DIE_WITH_FLAG``): no launcher in front of it.

``launch.py --group [--grace S] PARENT_PID -- PROGRAM [ARGS...]`` (``in_own_group``): a tiny
reaper for programs the agent runs to completion (git, uv, install.py, the self-test). A parent-
death signal alone is not enough for those: it reaches the exec'd program only, and whatever
that program started (``git-remote-http``, an install.py's ``sleep 3600 &``) is orphaned. So the
launcher
- asks for SIGTERM when its parent dies, and becomes the child subreaper of what it starts (an
  orphaned descendant, even one that left the group with setsid, is re-parented to it);
- starts the program in a new session and process group (no terminal: a git password prompt
  fails at once instead of stopping the group), with SIGKILL as the program's own parent-death
  signal;
- relays the program's exit status (its code, or the signal that killed it);
- on SIGTERM, SIGINT or SIGHUP (the agent's timeout or stop, or the agent's death), and when the
  program exits while something it started is still running, ends the program's group and every
  descendant: SIGTERM (and SIGCONT), then SIGKILL after ``--grace`` seconds. It exits only when
  nothing it started is left.

Used instead of ``preexec_fn``, which is unsafe in a threaded parent. Note that Linux sends the
parent-death signal when the *thread* that started the launcher ends: start it from a thread that
waits for it (subprocess.run), or from one that lives as long as the process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GROUP_FLAG = "--group"
DEFAULT_GRACE_S = 2.0
# The launcher's own file: run as a script, so it needs no package on sys.path (-I -S).
LAUNCH_PY = os.path.abspath(__file__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = {signal.SIGCHLD, *STOP_SIGNALS}
KILL_REPEAT_S = 0.1  # after the grace: SIGKILL again this often until nothing is left


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies; False where prctl is unavailable."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


# supervisord's own flag (services/supervisor/supervisord.py): ``--die-with AGENT_PID``.
DIE_WITH_FLAG = "--die-with"


def supervisord_argv(conf: Path) -> list[str]:
    """``supervisord -n -c CONF`` as the agent starts it: its log handlers made safe on a full
    disk, and dying with this process (services/supervisor/supervisord.py)."""
    return [
        sys.executable,
        "-m",
        "services.supervisor.supervisord",
        DIE_WITH_FLAG,
        str(os.getpid()),
        "-n",
        "-c",
        str(conf),
    ]


class LaunchRefused(RuntimeError):
    """No new program is started: the agent is stopping (``refuse_launches``)."""


_refusal: str | None = None


def refuse_launches(reason: str | None) -> None:
    """From now on ``in_own_group`` raises LaunchRefused(``reason``); None allows launches
    again. A stopping agent refuses them, so that work it no longer waits for (an install
    thread, a retry loop) fails fast instead of starting git or uv again."""
    global _refusal
    _refusal = reason


def in_own_group(
    argv: list[str], grace: float = DEFAULT_GRACE_S, parent: int | None = None
) -> list[str]:
    """``argv`` under the group launcher: in its own process group, killed whole (children
    included) when this process dies, when the launcher is sent SIGTERM, or when it exits.
    Raises LaunchRefused once ``refuse_launches`` was called."""
    if _refusal is not None:
        raise LaunchRefused(_refusal)
    return [
        sys.executable, "-I", "-S", LAUNCH_PY, GROUP_FLAG, "--grace", f"{grace:g}",
        str(os.getpid() if parent is None else parent), "--", *argv,
    ]


# -- the group launcher ---------------------------------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc (zombies included)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = data[data.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(root: int) -> list[int]:
    children = _children_by_parent()
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class _Reaper:
    """The launcher's state: the program, its exit status, the stop in progress."""

    def __init__(self, program: int, grace: float) -> None:
        self.program = program
        self.grace = grace
        self.me = os.getpid()
        self.status: os.waitid_result | None = None  # the program's exit, not yet reaped
        self.kill_at: float | None = None  # when SIGTERM turns into SIGKILL

    def signal_all(self, sig: int) -> None:
        """``sig`` to the program's group and to every process under the launcher. The group id
        is safe to use: the program is reaped only at the very end, so its pid is not reused."""
        with contextlib.suppress(OSError):
            os.killpg(self.program, sig)
        for pid in _descendants(self.me):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def terminate(self) -> None:
        """Ask everything to stop now; SIGKILL follows after the grace."""
        self.signal_all(signal.SIGTERM)
        self.signal_all(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + self.grace
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def others(self) -> list[int]:
        """Children other than the program, reaping those that have ended; notes the program's
        exit (without reaping it: its zombie keeps the group id from being reused)."""
        # The program's exit first: by the time it shows, the kernel has re-parented its
        # children to us, so the scan below cannot miss them.
        if self.status is None:
            self.status = os.waitid(
                os.P_PID, self.program, os.WEXITED | os.WNOHANG | os.WNOWAIT
            )
        alive = []
        for pid in _children_by_parent().get(self.me, []):
            if pid == self.program:
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if not done:
                alive.append(pid)
        return alive

    def run(self) -> os.waitid_result:
        ended_cleanup = False
        while True:
            others = self.others()
            if self.status is not None:
                if not others:
                    os.waitpid(self.program, 0)
                    return self.status
                if not ended_cleanup:  # the program is done: what it left running goes too
                    ended_cleanup = True
                    self.terminate()
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                self.signal_all(signal.SIGKILL)
                timeout: float | None = KILL_REPEAT_S
            else:
                timeout = None if self.kill_at is None else self.kill_at - now
            info = (
                signal.sigwaitinfo(WATCHED)
                if timeout is None
                else signal.sigtimedwait(WATCHED, timeout)
            )
            if info is not None and info.si_signo in STOP_SIGNALS:
                self.terminate()


def _exec_child(program: list[str], launcher: int, mask: set[signal.Signals]) -> None:
    """In the forked child: own session and group, die with the launcher, exec."""
    try:
        os.setsid()
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != launcher:
            os._exit(1)
        # Python ignores SIGPIPE and SIGXFSZ and may have found SIGINT ignored; an ignored
        # signal stays ignored across exec, so hand the program the defaults.
        for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.execvp(program[0], program)
    except OSError as exc:
        os.write(2, f"launch: cannot run {program[0]}: {exc.strerror}\n".encode())
    finally:
        os._exit(127)


def _exit_like(status: os.waitid_result) -> int:
    """The launcher's exit status: the program's code, or death by the program's signal."""
    if status.si_code == os.CLD_EXITED:
        return status.si_status
    sig = status.si_status
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # relay the signal, not a core dump
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    return 128 + sig


def run_group(parent: int, program: list[str], grace: float) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN would auto-reap
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    set_parent_death_signal(signal.SIGTERM)
    # The parent may have died before prctl took effect: then nobody would stop us.
    if os.getppid() != parent:
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    me = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        print(f"launch: cannot start {program[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    if pid == 0:
        _exec_child(program, me, mask)
    return _exit_like(_Reaper(pid, grace).run())


# -- command line -----------------------------------------------------------------------------


def _usage() -> int:
    print(
        "usage: launch.py --group [--grace SECONDS] PARENT_PID -- PROGRAM [ARGS...]",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    grace = DEFAULT_GRACE_S
    if args[:1] != [GROUP_FLAG]:
        return _usage()
    args = args[1:]
    if args[:1] == ["--grace"]:
        try:
            grace, args = float(args[1]), args[2:]
        except (IndexError, ValueError):
            return _usage()
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        return _usage()
    return run_group(int(args[0]), args[2:], grace)


if __name__ == "__main__":
    sys.exit(main())
