"""Reading instance log files (supervisord writes and rotates them to <log>.1): bounded
reads from the end or from an offset, whatever the line lengths."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from config.errors import LogFileRefused

# Bounds on what one log request reads: a tail reads at most MAX_TAIL_BYTES back from the
# end, a follow (?after=) at most MAX_FOLLOW_BYTES forward.
MAX_TAIL_BYTES = 1024 * 1024
MAX_FOLLOW_BYTES = 256 * 1024
READ_BLOCK = 64 * 1024


def open_log(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, never through a symlink (whoever
    can write the log directory must not make the agent read another file) nor a FIFO or
    device (which could block the reading thread). FileNotFoundError if absent,
    LogFileRefused if it is something else than a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LogFileRefused(f"{path} is a symbolic link; instance logs are read only from "
                                 "regular files: remove the link") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LogFileRefused(f"{path} is not a regular file; instance logs are read only "
                                 "from regular files: remove it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_end(path: Path, limit: int) -> str:
    """The end of a (possibly large, rotating) log file."""
    try:
        with open_log(path) as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except (OSError, LogFileRefused):
        return ""


@dataclass(frozen=True)
class LogChunk:
    """Lines read from an instance's log, and where a follow-up read continues."""

    lines: list[str]
    offset: int  # end of what was read in the current file; pass back as ?after=
    inode: int | None  # identity of the current file; a new one means it was rotated
    truncated: bool  # the byte bound cut the read short


def _split(data: bytes) -> list[str]:
    return [line.rstrip("\r") for line in data.decode("utf-8", "replace").split("\n")]


def _tail_bytes(path: Path, lines: int, budget: int) -> tuple[list[str], int, int, bool]:
    """Up to the last ``lines`` complete lines of ``path`` reading at most ``budget`` bytes
    back from its end; (lines, file size, inode, whether the budget cut it)."""
    with open_log(path) as f:
        inode = os.fstat(f.fileno()).st_ino  # of the file read, even if it is rotated meanwhile
        size = f.seek(0, os.SEEK_END)
        data = b""
        pos = size
        # lines + 1 newlines bound ``lines`` complete lines.
        while pos > 0 and data.count(b"\n") <= lines and size - pos < budget:
            step = min(READ_BLOCK, pos, budget - (size - pos))
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    found = _split(data.removesuffix(b"\n")) if data else []
    cut = pos > 0
    if cut:
        found = found[1:]  # the first line read is probably partial
    return found[-lines:], size, inode, cut and len(found) < lines


def tail_lines(path: Path, lines: int) -> LogChunk:
    """The last ``lines`` lines of an instance's log; the rotated ``<log>.1`` fills in when
    the current file has fewer (supervisord just rotated it). Bounded by MAX_TAIL_BYTES."""
    try:
        found, size, inode, cut = _tail_bytes(path, lines, MAX_TAIL_BYTES)
    except FileNotFoundError:
        return LogChunk([], 0, None, False)
    backup = path.with_name(path.name + ".1")
    if len(found) < lines and not cut:
        # The rotated file only fills in: absent or not a regular file, it is left out.
        with contextlib.suppress(FileNotFoundError, LogFileRefused):
            older, _, _, cut = _tail_bytes(backup, lines - len(found), MAX_TAIL_BYTES)
            found = older + found
    return LogChunk(found, size, inode, cut)


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


def _read_forward(path: Path, offset: int, inode: int | None) -> LogChunk:
    """Complete lines after ``offset`` (from 0 if ``path`` is another file than ``inode`` or
    shorter than ``offset``), at most MAX_FOLLOW_BYTES; ``truncated`` means more is there."""
    with open_log(path) as f:
        current = os.fstat(f.fileno())
        if (inode is not None and current.st_ino != inode) or current.st_size < offset:
            offset = 0
        f.seek(offset)
        data = f.read(MAX_FOLLOW_BYTES)
    full = len(data) == MAX_FOLLOW_BYTES
    end = data.rfind(b"\n")
    # Keep a partial last line for the next read, unless one line fills the whole bound.
    if end >= 0:
        data = data[: end + 1]
    elif not full:
        data = b""
    lines = _split(data.removesuffix(b"\n")) if data else []
    return LogChunk(lines, offset + len(data), current.st_ino, full)


def lines_after(path: Path, offset: int, inode: int | None) -> LogChunk:
    """Lines appended after ``offset`` of the file ``inode`` named in an earlier answer. If
    supervisord rotated the log since, the rest of the old file (now ``<log>.1``) comes first,
    then the new file from its start."""
    backup = path.with_name(path.name + ".1")
    try:
        if inode is not None and _inode(path) != inode and _inode(backup) == inode:
            chunk = _read_forward(backup, offset, inode)
            if chunk.lines or chunk.truncated:
                return chunk
            offset, inode = 0, None  # the old file is finished: go on with the new one
        return _read_forward(path, offset, inode)
    except FileNotFoundError:
        return LogChunk([], 0, None, False)
