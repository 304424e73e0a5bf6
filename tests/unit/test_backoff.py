"""The backoff policy (services/backoff.py): pure, so tested without processes or a clock."""

from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.settings import load_settings
from services.backoff import (
    BackoffPolicy,
    Decision,
    Failure,
    after_failure,
    crash_loop_words,
    delay_for,
    duration_words,
    policy_from,
    stable,
)

POLICY = BackoffPolicy(initial_s=30, max_s=600, stable_s=600)


def test_the_delay_doubles_from_the_initial_to_the_maximum() -> None:
    assert [delay_for(a, POLICY) for a in range(0, 8)] == [0, 30, 60, 120, 240, 480, 600, 600]
    assert delay_for(10_000, POLICY) == 600  # no overflow however long it fails


def test_fatal_backs_off_from_the_first_one() -> None:
    first = after_failure(Failure.FATAL, 0, 0, last_start=100.0, now=105.0, policy=POLICY)
    assert first == Decision(failures=1, attempt=1, delay_s=30)
    second = after_failure(Failure.FATAL, 1, 1, last_start=140.0, now=145.0, policy=POLICY)
    assert second == Decision(failures=2, attempt=2, delay_s=60)


def test_a_crash_loop_is_restarted_once_at_once_then_damped() -> None:
    # Started at 0; crashes at 20, 50, 90, 150 s: each within INSTANCE_STABLE_SECS of its start.
    decisions = []
    failures = attempt = 0
    start = 0.0
    for crash_at in (20.0, 50.0, 90.0, 150.0):
        d = after_failure(Failure.CRASH, failures, attempt, start, crash_at, POLICY)
        decisions.append(d)
        failures, attempt = d.failures, d.attempt
        start = crash_at + d.delay_s
    assert decisions == [
        Decision(1, 0, 0.0),  # supervisord's immediate restart: one kill -9 costs no backoff
        Decision(2, 1, 30.0),
        Decision(3, 2, 60.0),
        Decision(4, 3, 120.0),
    ]


def test_crashes_and_fatal_share_one_streak() -> None:
    crash = after_failure(Failure.CRASH, 0, 0, 0.0, 10.0, POLICY)
    fatal = after_failure(Failure.FATAL, crash.failures, crash.attempt, 10.0, 15.0, POLICY)
    assert fatal == Decision(2, 1, 30.0)
    again = after_failure(Failure.CRASH, fatal.failures, fatal.attempt, 50.0, 70.0, POLICY)
    assert again == Decision(3, 2, 60.0)


def test_a_run_of_stable_secs_ends_the_streak() -> None:
    assert stable(0.0, 600.0, POLICY) and not stable(0.0, 599.9, POLICY)
    assert not stable(None, 1e9, POLICY)
    # Attempt 5 so far, but this process ran 10 minutes: a first crash again, restarted at once.
    assert after_failure(Failure.CRASH, 6, 5, 0.0, 600.0, POLICY) == Decision(1, 0, 0.0)
    assert after_failure(Failure.FATAL, 6, 5, 0.0, 601.0, POLICY) == Decision(1, 1, 30.0)
    # ... and one that did not: the streak goes on.
    assert after_failure(Failure.CRASH, 6, 5, 0.0, 599.0, POLICY) == Decision(7, 6, 600.0)


def test_the_reason_says_it_in_words() -> None:
    assert crash_loop_words([0.0, 40.0, 90.0, 180.0], 180.0, 220.0) == (
        "crash loop: 4 crashes in 3 min, next start in 40 s"
    )
    assert crash_loop_words([10.0], 12.0, 13.4) == "crash loop: 1 crash in 2 s, next start in 1 s"
    assert [duration_words(s) for s in (0.2, 59.6, 119, 180, 7199, 7200, 36000)] == [
        "0 s", "60 s", "119 s", "3 min", "120 min", "2 h", "10 h",
    ]


def test_settings_build_the_policy_and_are_checked() -> None:
    settings = load_settings(
        {
            "INSTANCE_FATAL_BACKOFF": "1",
            "INSTANCE_FATAL_BACKOFF_MAX": "4",
            "INSTANCE_STABLE_SECS": "30",
        }
    )
    assert policy_from(settings) == BackoffPolicy(1.0, 4.0, 30.0)
    assert policy_from(load_settings({})) == BackoffPolicy(30.0, 600.0, 600.0)
    with pytest.raises(ConfigError) as err:
        load_settings({"INSTANCE_FATAL_BACKOFF": "60", "INSTANCE_FATAL_BACKOFF_MAX": "10"})
    [problem] = err.value.problems
    assert problem.source == "INSTANCE_FATAL_BACKOFF_MAX" and problem.given == "'10'"
    assert "below INSTANCE_FATAL_BACKOFF=60" in problem.message
    for name, value in (
        ("INSTANCE_FATAL_BACKOFF", "0"),
        ("INSTANCE_FATAL_BACKOFF_MAX", "-1"),
        ("INSTANCE_STABLE_SECS", "soon"),
        ("GPU_UNHEALTHY_SAMPLES", "0"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings({name: value})
        assert [p.source for p in err.value.problems] == [name], (name, err.value.problems)
