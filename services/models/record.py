"""The record of verified files (path, size, mtime, sha256): a warm boot trusts a file whose
size and mtime still match what was hashed, instead of hashing it again."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from services.files import atomic_write_text
from services.models.paths import RECORD_NAME

log = logging.getLogger(__name__)

RECORD_MAX_BYTES = 16 << 20  # ~100 bytes an entry: far more models than any manifest has
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Verified:
    size: int
    mtime_ns: int
    sha256: str


def read_json(path: Path, max_bytes: int) -> object:
    """The JSON value in ``path``, read without blocking on a FIFO or reading a huge file.
    FileNotFoundError when absent; another OSError, or ValueError (not a regular file, too
    big, not UTF-8, not JSON), when it cannot be used."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes, more than the {max_bytes} expected")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:  # nested deeper than the parser goes
        raise ValueError("nested too deeply") from None


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entries(data: object) -> dict[str, Verified]:
    """The record's entries; ValueError naming the first thing of an unexpected shape."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object of models, got {type(data).__name__}")
    entries = {}
    for name, entry in data.items():
        if not (
            isinstance(entry, dict)
            and {"size", "mtime_ns", "sha256"} <= set(entry)
            and _int(entry["size"])
            and _int(entry["mtime_ns"])
            and isinstance(entry["sha256"], str)
            and HEX64.match(entry["sha256"])
        ):
            raise ValueError(f"the entry {name[:200]!r} is not a size, mtime_ns and sha256")
        entries[name] = Verified(entry["size"], entry["mtime_ns"], entry["sha256"])
    return entries


class VerifiedRecord:
    """``<models_path>/.comfy-machine-verified.json``: model name -> Verified. A record of
    any unexpected shape (not JSON, not an object of entries, an entry without its size,
    mtime_ns and sha256) is treated as absent: it only costs hashing the files again."""

    def __init__(self, models_path: Path) -> None:
        self.path = models_path / RECORD_NAME
        self._entries: dict[str, Verified] = {}
        try:
            self._entries = _entries(read_json(self.path, RECORD_MAX_BYTES))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a bad record only costs a re-hash
            log.warning(
                "verified record unusable; the models on disk are hashed again",
                extra={"fields": {"path": str(self.path), "error": str(exc)[:300]}},
            )

    def lookup(self, name: str, path: Path, sha256: str | None, size: int | None) -> str | None:
        """The recorded sha256 if ``path`` is unchanged since it was hashed and agrees with
        the manifest's size and sha256; None when it must be hashed again."""
        entry = self._entries.get(name)
        if entry is None or entry.size == 0:  # a model is never empty
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

    def add(self, name: str, path: Path, sha256: str) -> int:
        """Record ``path`` as hashed to ``sha256``; its size."""
        st = os.stat(path)
        self._entries[name] = Verified(st.st_size, st.st_mtime_ns, sha256)
        self.save()
        return st.st_size

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
