"""Session-wide: no directory a test made under /tmp outlives the run."""

from __future__ import annotations

import shutil

import pytest

from tests.support import SHORT_TMPDIRS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for path in SHORT_TMPDIRS:
        shutil.rmtree(path, ignore_errors=True)
