"""Logging set-up like ComfyUI's ``app/logger.py``.

ComfyUI replaces ``sys.stdout``/``sys.stderr`` with interceptors that keep the last 300
writes in a ring buffer (served by ``/internal/logs`` and ``/internal/logs/raw``) and logs
with the bare ``%(message)s`` format to stderr (or to stdout with ``--log-stdout``, where
only ERROR and above stay on stderr). Every write is flushed at once because the stand-in
may run without ``PYTHONUNBUFFERED`` under a supervisor that reads its output live.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from datetime import datetime
from typing import Any, TextIO

LOG_CAPACITY = 300

_logs: deque[dict[str, str]] = deque(maxlen=LOG_CAPACITY)
_lock = threading.Lock()


class LogInterceptor:
    """A text stream that records each write in the ring buffer, then writes and flushes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: str) -> int:
        """Record ``data`` with a timestamp and pass it on to the real stream."""
        entry = {"t": datetime.now().isoformat(), "m": data}
        with _lock:
            # Like ComfyUI: a carriage-return update replaces an unfinished last line, so
            # progress bars do not fill the buffer.
            if data.startswith("\r") and _logs and not _logs[-1]["m"].endswith("\n"):
                _logs.pop()
            _logs.append(entry)
        written = self._stream.write(data)
        self._stream.flush()
        return written

    def flush(self) -> None:
        """Flush the real stream."""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        # fileno(), isatty(), encoding, ... come from the wrapped stream.
        return getattr(self._stream, name)


def setup_logger(log_level: str = "INFO", use_stdout: bool = False) -> None:
    """Install the interceptors and the root handlers (ComfyUI's ``setup_logger``)."""
    sys.stdout = LogInterceptor(sys.stdout)  # type: ignore[assignment]
    sys.stderr = LogInterceptor(sys.stderr)  # type: ignore[assignment]

    logger = logging.getLogger()
    logger.setLevel(log_level)
    formatter = logging.Formatter("%(message)s")

    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(formatter)
    if use_stdout:
        # Only errors and critical stay on stderr, everything lesser goes to stdout.
        stream_handler.addFilter(lambda record: record.levelno >= logging.ERROR)
        stdout_handler = logging.StreamHandler(sys.stdout)
        stdout_handler.setFormatter(formatter)
        stdout_handler.addFilter(lambda record: record.levelno < logging.ERROR)
        logger.addHandler(stdout_handler)
    logger.addHandler(stream_handler)


def get_logs() -> list[dict[str, str]]:
    """Return a copy of the ring buffer, oldest first, as ``[{"t": iso, "m": text}]``."""
    with _lock:
        return list(_logs)


def terminal_size() -> tuple[int, int]:
    """Return ``(cols, rows)`` of the controlling terminal, 80x24 when there is none."""
    for fd in (sys.__stdout__, sys.__stderr__):
        try:
            size = os.get_terminal_size(fd.fileno()) if fd is not None else None
        except (OSError, ValueError):
            continue
        if size is not None:
            return size.columns, size.lines
    return 80, 24
