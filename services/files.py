"""File helpers: writes that are never seen half-done, state files no other user reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Literal

# State files (the lock, records, logs) may name what is installed and where: owner and group.
PRIVATE_MODE = 0o640


def atomic_write_text(path: Path, text: str, mode: int = PRIVATE_MODE) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename: readers see old or new.
    The file is created with ``mode`` (0640 unless said otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_private(path: Path, mode: Literal["wb", "ab"] = "wb") -> IO[bytes]:
    """Open ``path`` for writing (truncate or append), created 0640 (an existing file is made
    0640 too): for logs that may hold what a process printed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` (not following a symlink); None when it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_same(path: Path, identity: tuple[int, int] | None) -> bool:
    """Remove ``path`` only if it is still the file we created (``identity``); never one that
    another process has put there since. True if removed."""
    if identity is None or file_identity(path) != identity:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
