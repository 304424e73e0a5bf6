"""Structured logs: one JSON object per line off a TTY, readable lines on one; no secrets."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

SECRET_KEY = re.compile(r"token|authorization|password|passwd|secret|api[_-]?key|cookie", re.I)
# Credentials embedded in URLs (https://user:token@host/...).
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def redact(value: Any, key: str = "") -> Any:
    """``value`` with secrets masked: by key name, and credentials inside URLs."""
    if key and SECRET_KEY.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return URL_CREDENTIALS.sub("***@", value)
    return value


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return redact(getattr(record, "fields", {}) or {})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items() if v not in (None, ""))
        line = f"{stamp} {record.levelname:<7} {redact(record.getMessage())} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger to ``stream`` (stderr), as JSON unless it is a terminal."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if stream.isatty() else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
