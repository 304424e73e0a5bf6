"""Unpack a custom node's zip archive into ``custom_nodes/<name>``, refusing anything unsafe.

The archive is written into a staging directory beside the node (same file system, under a
``*.disabled`` directory ComfyUI never imports) and swapped in whole by rename, so a half-
unpacked node is never at ``custom_nodes/<name>``. Refused, with nothing of the archive kept:
an entry outside the node (``..``, an absolute path: zip-slip), a symlink that points outside
it (checked by where it really resolves, once every entry is in place), a device or FIFO, an
entry that appears twice, more than ``max_entries`` entries or more than ``max_bytes`` bytes
unpacked (counted as written, whatever the archive declares: a zip bomb stops at the cap).

Blocking (file I/O)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from config.errors import InstallError

# Inside custom_nodes/: ComfyUI skips entries whose name ends in ".disabled".
STAGING_DIR = ".comfy-machine-unpack.disabled"
MAX_UNPACKED_BYTES = 2 << 30
MAX_ENTRIES = 100_000
MAX_LINK_TARGET = 4096
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnpackRefused(InstallError):
    """The archive breaks a rule (the message names the entry and the rule); nothing of it was
    kept."""


def staging_root(dest: Path) -> Path:
    return dest.parent / STAGING_DIR


def clean_staging(dest: Path) -> None:
    """Remove what an interrupted unpack of ``dest`` left in the staging directory."""
    root = staging_root(dest)
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if entry.name.startswith((f"{dest.name}.new-", f"{dest.name}.old-")):
                _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def unpack_zip(
    archive: Path,
    dest: Path,
    what: str,
    *,
    extra_files: dict[str, str] | None = None,
    list_file: str | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_entries: int = MAX_ENTRIES,
) -> list[str]:
    """Unpack ``archive`` and swap it in at ``dest`` (replacing what was there), with
    ``extra_files`` (name -> text) and ``list_file`` (the member names, one a line: what
    ComfyUI-Manager writes to ``.tracking``) at its top; the archive's member names, as listed.
    UnpackRefused naming ``what`` and the entry when a rule is broken: then ``dest`` is as it
    was."""
    root = staging_root(dest)
    root.mkdir(parents=True, exist_ok=True)
    clean_staging(dest)
    staging = root / f"{dest.name}.new-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        names = _extract(archive, staging, what, max_bytes, max_entries)
        written = dict(extra_files or {})
        if list_file is not None:
            written[list_file] = "\n".join(names)
        for name, text in written.items():
            path = staging / name
            if path.is_dir() and not path.is_symlink():
                raise UnpackRefused(f"{what}: the archive has a directory {name!r}, a name "
                                    "comfy-machine writes itself; nothing of it was installed")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            path.write_text(text)
        _swap(staging, dest, root)
    except BaseException:
        _remove_tree(staging)
        raise
    return names


def _swap(staging: Path, dest: Path, root: Path) -> None:
    """Rename ``staging`` to ``dest``; what was at ``dest`` is moved aside first, then removed."""
    old = None
    if os.path.lexists(dest):
        old = root / f"{dest.name}.old-{secrets.token_hex(4)}"
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except OSError:
        if old is not None:  # put back what was there
            os.rename(old, dest)
        raise
    if old is not None:
        _remove_tree(old)


def _refused(what: str, entry: str, why: str) -> UnpackRefused:
    return UnpackRefused(
        f"{what}: archive refused: entry {entry[:200]!r} {why}; nothing of it was installed"
    )


def _parts(what: str, name: str) -> list[str]:
    """The path parts of member ``name`` inside the node; UnpackRefused if it leaves it."""
    if "\0" in name or "\\" in name:
        raise _refused(what, name, "has a NUL or '\\' in its name")
    if name.startswith("/") or _DRIVE.match(name):
        raise _refused(what, name, "is an absolute path (zip-slip): it would be written outside "
                       "the node's folder")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refused(what, name, "has a '..' part (zip-slip): it would be written outside "
                       "the node's folder")
    return parts


def _mkdirs(what: str, root: Path, parts: list[str], entry: str) -> None:
    """The directories ``parts`` under ``root`` (none of them a symlink: links come last)."""
    try:
        root.joinpath(*parts).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _refused(what, entry, "is a directory where the archive has a file") from None


def _extract(
    archive: Path, root: Path, what: str, max_bytes: int, max_entries: int
) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as zf:
            return _extract_members(zf, root, what, max_bytes, max_entries)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression.
        raise UnpackRefused(
            f"{what}: the archive is not a readable zip file ({exc}); nothing of it was installed"
        ) from None


def _extract_members(
    zf: zipfile.ZipFile, root: Path, what: str, max_bytes: int, max_entries: int
) -> list[str]:
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise UnpackRefused(f"{what}: archive refused: {len(infos)} entries, more than "
                            f"{max_entries}; nothing of it was installed")
    declared = sum(i.file_size for i in infos)
    if declared > max_bytes:
        raise UnpackRefused(f"{what}: archive refused: it unpacks to {declared} bytes, more than "
                            f"the cap of {max_bytes}; nothing of it was installed")
    written = 0
    links: list[tuple[str, list[str], str]] = []
    for info in infos:
        parts = _parts(what, info.filename)
        if not parts:
            continue
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            if info.file_size > MAX_LINK_TARGET:
                raise _refused(what, info.filename, "is a symlink with an oversized target")
            links.append((info.filename, parts, zf.read(info).decode("utf-8", "replace")))
            continue
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refused(what, info.filename, "is a device, FIFO or socket, not a file")
        if info.is_dir() or kind == stat.S_IFDIR:
            _mkdirs(what, root, parts, info.filename)
            continue
        _mkdirs(what, root, parts[:-1], info.filename)
        written = _write_member(zf, info, root.joinpath(*parts), what, written, max_bytes, mode)
    for name, parts, target in links:
        _link(what, root, name, parts, target)
    _check_links(what, root, links)
    return zf.namelist()


def _write_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    path: Path,
    what: str,
    written: int,
    max_bytes: int,
    mode: int,
) -> int:
    """Write one file entry (never over an existing entry, never through a link); the bytes
    written so far in the archive."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o755 if mode & 0o111 else 0o644)
    except FileExistsError:
        raise _refused(what, info.filename, "appears twice in the archive") from None
    except (IsADirectoryError, NotADirectoryError):
        raise _refused(what, info.filename, "is a file where the archive has a directory") from None
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise UnpackRefused(
                    f"{what}: archive refused: it unpacks to more than the cap of {max_bytes} "
                    "bytes; nothing of it was installed"
                )
            out.write(chunk)
    return written


def _link(what: str, root: Path, name: str, parts: list[str], target: str) -> None:
    """A symlink entry whose target stays inside the node (checked again once all exist)."""
    if not target or "\0" in target or target.startswith("/") or _DRIVE.match(target):
        raise _refused(what, name, f"is a symlink to {target[:200]!r}, outside the node's folder")
    where = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
    if where == ".." or where.startswith("../"):
        raise _refused(what, name, f"is a symlink to {target[:200]!r}, outside the node's folder")
    _mkdirs(what, root, parts[:-1], name)
    try:
        os.symlink(target, root.joinpath(*parts))
    except FileExistsError:
        raise _refused(what, name, "appears twice in the archive") from None


def _check_links(what: str, root: Path, links: list[tuple[str, list[str], str]]) -> None:
    """Every symlink resolves inside the node, as the kernel follows it (a chain of links each
    inside can still lead out, e.g. through a link to the top and '..')."""
    real_root = os.path.realpath(root)
    for name, parts, target in links:
        real = os.path.realpath(root.joinpath(*parts))
        if real != real_root and not real.startswith(real_root + os.sep):
            raise _refused(what, name, f"is a symlink to {target[:200]!r} that resolves outside "
                           "the node's folder")
