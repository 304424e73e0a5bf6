"""Session-wide: no directory a test made under /tmp outlives the run, no test writes the
user's own cache (`plan` keeps its last answer there: machine/plan_cache.py), and the processes
the tests start get SIGINT as a user's terminal would send it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

from tests.support import SHORT_TMPDIRS


def pytest_configure(config: pytest.Config) -> None:
    # Run as a shell's background job (`pytest &`, a CI script), this process starts with SIGINT
    # ignored, and an ignored signal stays ignored in every child: a `logs -f` or an agent the
    # tests stop with SIGINT would never see it. A handled signal is reset to the default in a
    # child, as a terminal's Ctrl-C would find it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def private_cache_home() -> Iterator[str]:
    """XDG_CACHE_HOME for the whole run (every CLI and agent the tests start inherits it)."""
    path = tempfile.mkdtemp(prefix="cm-cache-")
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = path
    yield path
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
    shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for path in SHORT_TMPDIRS:
        shutil.rmtree(path, ignore_errors=True)
