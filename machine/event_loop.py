"""Which event loop the agent runs on (MACHINE_EVENT_LOOP)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from config.errors import ConfigError

T = TypeVar("T")
LoopChoice = Literal["asyncio", "uvloop"]


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "asyncio") -> T:
    """Run ``main`` to completion on asyncio's own loop or on uvloop. asyncio's is the default:
    with the health protocol answering polls itself, uvloop added no throughput in
    bench/health_rps.py and showed a p99 tail in some rounds (bench/README.md)."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise ConfigError(
                "MACHINE_EVENT_LOOP=uvloop: uvloop is not installed; "
                "pip install 'comfy-machine[uvloop]' or set MACHINE_EVENT_LOOP=asyncio"
            ) from None
        return uvloop.run(main)
    return asyncio.run(main)
