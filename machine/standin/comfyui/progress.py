"""Interrupt flag and progress reporting, the parts of ``comfy.model_management`` and
``comfy.utils.ProgressBar`` that nodes call while they run.

The executor installs a hook for the node being run; ``ProgressBar`` updates go through it
to the websocket (``progress`` and ``progress_state`` messages, plus a binary preview
frame when an image is given). Custom nodes can ``from progress import ProgressBar``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# (value, total, preview) -> None; preview is ("PNG", png_bytes, max_size) or None.
ProgressHook = Callable[[int, int, "tuple[str, bytes, int | None] | None"], None]

_interrupt = threading.Event()
_hook: ProgressHook | None = None


class InterruptProcessingException(Exception):
    """Raised inside a running node after ``POST /interrupt``."""


def interrupt_processing(value: bool = True) -> None:
    """Request (or with ``False`` clear) an interrupt of the running prompt."""
    if value:
        _interrupt.set()
    else:
        _interrupt.clear()


def processing_interrupted() -> bool:
    """Whether an interrupt is pending."""
    return _interrupt.is_set()


def throw_exception_if_processing_interrupted() -> None:
    """Raise :class:`InterruptProcessingException` once if an interrupt is pending."""
    if _interrupt.is_set():
        _interrupt.clear()
        raise InterruptProcessingException()


def set_progress_hook(hook: ProgressHook | None) -> None:
    """Install the hook that receives progress updates (done by the executor)."""
    global _hook
    _hook = hook


class ProgressBar:
    """ComfyUI's ``comfy.utils.ProgressBar``: report ``current`` of ``total`` steps."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.current = 0

    def update_absolute(
        self, value: int, total: int | None = None, preview: Any | None = None
    ) -> None:
        """Set the progress to ``value`` (capped at ``total``), optionally with a preview."""
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if _hook is not None:
            _hook(self.current, self.total, preview)

    def update(self, value: int) -> None:
        """Advance the progress by ``value`` steps."""
        self.update_absolute(self.current + value)
