"""When the agent starts a failing instance again: a pure policy, no processes, no clock.

Two kinds of failure count toward one backoff streak (as Kubernetes' CrashLoopBackOff does):
- FATAL: supervisord gave up after ``INSTANCE_START_RETRIES`` failed starts in a row;
- a crash: the process exited after it had started, within ``INSTANCE_STABLE_SECS`` of its
  start. The first crash of a streak is restarted at once (supervisord's autorestart: one
  ``kill -9`` costs seconds, not a backoff); from the second on the agent holds the restart.

Each held start waits ``INSTANCE_FATAL_BACKOFF`` doubling per attempt up to
``INSTANCE_FATAL_BACKOFF_MAX``. A process that ran ``INSTANCE_STABLE_SECS`` ends the streak."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from config.settings import Settings

# 2**40 times any initial delay is past any maximum: the exponent stops there (no overflow).
MAX_DOUBLINGS = 40


class Failure(StrEnum):
    FATAL = "fatal"  # supervisord gave up starting it
    CRASH = "crash"  # it exited after it had started


@dataclass(frozen=True)
class BackoffPolicy:
    initial_s: float = 30.0
    max_s: float = 600.0
    stable_s: float = 600.0


@dataclass(frozen=True)
class Decision:
    """What to do after a failure."""

    failures: int  # failures in this streak, this one included
    attempt: int  # held starts in this streak, the one this decides included (0: none)
    delay_s: float  # seconds until the next start; 0: supervisord restarts it at once


def policy_from(settings: Settings) -> BackoffPolicy:
    return BackoffPolicy(
        initial_s=settings.instance_fatal_backoff,
        max_s=settings.instance_fatal_backoff_max,
        stable_s=settings.instance_stable_secs,
    )


def delay_for(attempt: int, policy: BackoffPolicy) -> float:
    """The wait before held start number ``attempt`` (1, 2, ...): initial doubling to max."""
    if attempt <= 0:
        return 0.0
    return min(policy.initial_s * 2.0 ** min(attempt - 1, MAX_DOUBLINGS), policy.max_s)


def stable(last_start: float | None, now: float, policy: BackoffPolicy) -> bool:
    """The process started at ``last_start`` has run long enough to end a streak."""
    return last_start is not None and now - last_start >= policy.stable_s


def after_failure(
    kind: Failure,
    failures: int,
    attempt: int,
    last_start: float | None,
    now: float,
    policy: BackoffPolicy,
) -> Decision:
    """The decision on a failure at ``now`` of the process started at ``last_start``, given
    the streak so far (``failures``, ``attempt``; 0, 0 for none)."""
    if stable(last_start, now, policy):
        failures, attempt = 0, 0
    failures += 1
    if kind is Failure.CRASH and failures == 1:
        return Decision(failures, attempt, 0.0)
    attempt += 1
    return Decision(failures, attempt, delay_for(attempt, policy))


def crash_loop_words(crash_times: list[float], now: float, next_start_at: float) -> str:
    """'crash loop: 4 crashes in 3 min, next start in 40 s' for a streak of crashes."""
    count = len(crash_times)
    span = now - crash_times[0] if crash_times else 0.0
    return (
        f"crash loop: {count} crash{'es' if count != 1 else ''} in {duration_words(span)}, "
        f"next start in {duration_words(max(next_start_at - now, 0.0))}"
    )


def duration_words(seconds: float) -> str:
    """'40 s', '3 min', '2 h': rounded the way a person reads a countdown."""
    if seconds < 120:
        return f"{max(round(seconds), 0)} s"
    if seconds < 2 * 3600:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h"
