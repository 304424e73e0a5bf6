"""Retries and timeouts of HTTP downloads (models, registry archives): settings, no I/O, so
the install inputs can carry them without importing an HTTP client."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FetchOptions:
    """DOWNLOAD_RETRIES with their backoff, and the connect and read timeouts."""

    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
