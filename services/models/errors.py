"""The model errors: each names the model, what was expected and what was found."""

from __future__ import annotations

from config.errors import MachineError


class ModelError(MachineError):
    """A model could not be fetched or verified; the message names it (never a token)."""


class TransientError(Exception):
    """A failure worth retrying (connection dropped, 5xx, timeout)."""
