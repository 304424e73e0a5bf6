"""The record of verified files (path, size, mtime, sha256): a warm boot trusts a file whose
size and mtime still match what was hashed, instead of hashing it again."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from services.files import atomic_write_text
from services.models.paths import RECORD_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verified:
    size: int
    mtime_ns: int
    sha256: str


class VerifiedRecord:
    """``<models_path>/.comfy-machine-verified.json``: model name -> Verified."""

    def __init__(self, models_path: Path) -> None:
        self.path = models_path / RECORD_NAME
        self._entries: dict[str, Verified] = {}
        try:
            data = json.loads(self.path.read_text())
            self._entries = {name: Verified(**entry) for name, entry in data.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:  # a bad record only costs a re-hash
            log.warning(
                "verified record unreadable",
                extra={"fields": {"path": str(self.path), "error": str(exc)}},
            )

    def lookup(self, name: str, path: Path, sha256: str | None, size: int | None) -> str | None:
        """The recorded sha256 if ``path`` is unchanged since it was hashed and agrees with
        the manifest's size and sha256; None when it must be hashed again."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
            return None
        if (sha256 is not None and sha256 != entry.sha256) or (
            size is not None and size != entry.size
        ):
            return None
        return entry.sha256

    def add(self, name: str, path: Path, sha256: str) -> None:
        st = os.stat(path)
        self._entries[name] = Verified(st.st_size, st.st_mtime_ns, sha256)
        self.save()

    def forget(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        text = json.dumps({k: asdict(v) for k, v in sorted(self._entries.items())}, indent=1)
        try:
            atomic_write_text(self.path, text + "\n")
        except OSError as exc:  # a read-only store still works, it just re-hashes next boot
            log.warning(
                "verified record not saved",
                extra={"fields": {"path": str(self.path), "error": str(exc)}},
            )
