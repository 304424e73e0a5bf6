"""Requirement files of ComfyUI and custom nodes: checked line by line.

``check_requirements`` is pure. ``outside_problems`` keeps a custom node's requirements inside
the node: it reads the node's file and the files it includes, and nothing outside the node."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement

from config.errors import Problem

# Lines uv understands that are not PEP 508 requirements.
PASS_THROUGH = ("-r ", "-c ", "-e ", "--", "git+", "http://", "https://", "file:")
INCLUDE_OPTIONS = ("-r", "--requirement", "-c", "--constraint")
EDITABLE_OPTIONS = ("-e", "--editable")
# Options that decide where packages come from for the whole, shared resolution.
INDEX_OPTIONS = (
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--trusted-host",
)
VCS_PREFIXES = ("git+", "hg+", "svn+", "bzr+")
MAX_INCLUDE_DEPTH = 10
_LONG_OPTION = re.compile(r"^(--[A-Za-z0-9-]+)(?:\s*=\s*|\s+|$)(.*)$")
_SHORT_OPTION = re.compile(r"^(-[A-Za-z])\s*(.*)$")


@dataclass(frozen=True)
class RequirementsFile:
    owner: str  # "ComfyUI" or the custom node's name
    path: Path
    names: frozenset[str]  # normalized project names it asks for (for conflict reports)
    includes: tuple[Path, ...] = ()  # files it includes (-r/-c), inside the node


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return name.lower().replace("_", "-").replace(".", "-")


def check_requirements(owner: str, path: Path, text: str) -> tuple[RequirementsFile, list[Problem]]:
    """Parse ``text`` (the file at ``path``); a Problem per line that no installer accepts."""
    names: set[str] = set()
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#") or line.startswith(PASS_THROUGH):
            continue
        try:
            names.add(normalize(Requirement(line).name))
        except InvalidRequirement as exc:
            problems.append(
                Problem(
                    f"{owner}: {path.name} line {number}",
                    line,
                    f"not a valid requirement ({exc}); fix or remove the line",
                )
            )
    return RequirementsFile(owner, path, frozenset(names)), problems


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with comments dropped and ``\\`` continuations joined, as
    pip and uv read them."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line = (pending + raw).strip()
        pending = ""
        if line.startswith("#"):
            continue
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def outside_problems(owner: str, path: Path, root: Path) -> tuple[list[Problem], list[Path]]:
    """The lines of a custom node's requirements file ``path`` (and of the files it includes)
    that reach outside the node directory ``root``: an include (-r/-c) or a package path
    outside it, an index or find-links option, an environment variable. Returns the Problems
    (node, file and line, why) and the included files. Nothing outside ``root`` is read."""
    problems: list[Problem] = []
    includes: list[Path] = []
    real_root = Path(os.path.realpath(root))
    if not _inside(path, real_root):
        where = f"{owner}: {path.name}"
        return [Problem(where, "(a link)", "is a link to a file outside the node; "
                        "a node's requirements must be files of the node")], []
    pending = [(path, 0)]
    seen: set[Path] = set()
    while pending:
        current, depth = pending.pop()
        real = Path(os.path.realpath(current))
        if real in seen:
            continue
        seen.add(real)
        try:
            text = real.read_text(errors="replace")
        except OSError as exc:
            problems.append(Problem(f"{owner}: {_shown(current, real_root)}", "",
                                    f"cannot be read ({exc.strerror})"))
            continue
        for number, line in logical_lines(text):
            where = f"{owner}: {_shown(current, real_root)} line {number}"
            reason, include = _line_reason(line, current.parent, real_root)
            if reason:
                problems.append(Problem(where, line, reason))
            elif include is not None:
                if depth >= MAX_INCLUDE_DEPTH:
                    problems.append(Problem(where, line, "includes nested too deeply"))
                else:
                    includes.append(include)
                    pending.append((include, depth + 1))
    return problems, includes


def _line_reason(line: str, base: Path, root: Path) -> tuple[str | None, Path | None]:
    """Why ``line`` reaches outside the node (or None), and the file it includes if any."""
    if "${" in line:
        return (
            "uses an environment variable (${...}), which would read comfy-machine's "
            "environment; write the value out",
            None,
        )
    option = _option(line)
    if option is not None:
        name, value = option
        if name in INDEX_OPTIONS:
            return (
                f"{name} changes where packages come from for every node and ComfyUI (one "
                "shared resolution); a node may not set it",
                None,
            )
        if name in INCLUDE_OPTIONS:
            return _include_reason(value, base, root)
        if name in EDITABLE_OPTIONS:
            if value.startswith(VCS_PREFIXES):
                return None, None
            return _path_reason(value, root), None
        return None, None
    if line.startswith((".", "/", "~", "file:")):
        return _path_reason(line.split(";", 1)[0].split()[0], root), None
    if " @ " in line:
        target = line.split(" @ ", 1)[1].split(";", 1)[0].strip().split()[0]
        if not target.startswith(("http://", "https://", *VCS_PREFIXES)):
            return _path_reason(target, root), None
    return None, None


def _option(line: str) -> tuple[str, str] | None:
    if not line.startswith("-"):
        return None
    match = (_LONG_OPTION if line.startswith("--") else _SHORT_OPTION).match(line)
    if match is None:
        return line.split()[0], ""
    return match.group(1), match.group(2).strip()


def _include_reason(value: str, base: Path, root: Path) -> tuple[str | None, Path | None]:
    if not value:
        return "names no file", None
    scheme = urlsplit(value).scheme
    if scheme and scheme != "file" and len(scheme) > 1:
        return "includes a remote file; a node's requirements must be files of the node", None
    path = Path(unquote(urlsplit(value).path)) if scheme == "file" else base / value
    if value.startswith("~") or not _inside(path, root):
        return "includes a file outside the node; a node may include only its own files", None
    return None, path


def _path_reason(value: str, root: Path) -> str | None:
    """A package given by path: only an absolute path inside the node."""
    path_text = unquote(urlsplit(value).path) if value.startswith("file:") else value
    if not path_text.startswith("/"):
        # uv resolves these against its working directory (comfy-machine's), not the node.
        return (
            "is a relative path, which resolves against comfy-machine's working directory, "
            "not the node; use a package name or URL"
        )
    if not _inside(Path(path_text), root):
        return "is a path outside the node; a node may install only its own files or packages"
    return None


def _inside(path: Path, real_root: Path) -> bool:
    """``path``, links resolved, is ``real_root`` or under it."""
    real = Path(os.path.realpath(path))
    return real == real_root or real_root in real.parents


def _shown(path: Path, real_root: Path) -> str:
    real = Path(os.path.realpath(path))
    return str(real.relative_to(real_root)) if real_root in real.parents else path.name
