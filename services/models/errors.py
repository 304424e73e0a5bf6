"""The model errors: each names the model, what was expected and what was found."""

from __future__ import annotations

from config.errors import MachineError


class ModelError(MachineError):
    """A model could not be fetched or verified; the message names it (never a token)."""


class ChecksumMismatch(ModelError):
    """The bytes fetched are not the ones expected (size or sha256); the file was removed."""

    def __init__(self, message: str, expected: str | None, got: str) -> None:
        super().__init__(message)
        self.expected, self.got = expected, got  # the sha256s (expected None: a size mismatch)


class TransientError(Exception):
    """A failure worth retrying (connection dropped, 5xx, timeout)."""
