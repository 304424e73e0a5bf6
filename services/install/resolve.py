"""One resolution of ComfyUI's and every custom node's requirements under the pins (a uv dry
run); when it has no solution, find which nodes conflict, and with what, by resolving subsets.

Blocking (uv subprocesses). Applying ``on_conflict`` (fail, or skip the nodes) is the
installer's: this module only says what resolves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config.errors import InstallError
from services.install import pyenv
from services.install.requirements import RequirementsFile


@dataclass(frozen=True)
class Conflict:
    """A custom node whose requirements cannot be installed with the accepted ones."""

    owner: str  # the custom node
    message: str  # names it, what it conflicts with, and uv's cause


@dataclass(frozen=True)
class ResolveResult:
    resolution: pyenv.Resolution  # what to install: every file, or those that fit together
    conflicts: tuple[Conflict, ...] = ()


def _resolves(
    python: Path, files: list[RequirementsFile], like: pyenv.Resolution
) -> pyenv.UvResult:
    """A dry run of ``files`` under the constraints and exclusions of ``like``."""
    attempt = pyenv.Resolution([f.path for f in files], like.constraints_file, like.excludes_file)
    return pyenv.install(python, attempt, dry_run=True)


def resolve(
    python: Path,
    base: RequirementsFile | None,
    node_files: list[RequirementsFile],
    constraints_file: Path,
    excludes_file: Path,
) -> ResolveResult:
    """Every file in one resolution; when it has none, the conflicting nodes left out (with
    why). InstallError when uv fails otherwise, or ComfyUI's own requirements do not resolve."""
    files = ([base] if base else []) + node_files
    resolution = pyenv.Resolution([f.path for f in files], constraints_file, excludes_file)
    result = pyenv.install(python, resolution, dry_run=True)
    if result.ok:
        return ResolveResult(resolution)
    if not result.unsatisfiable:
        raise InstallError(f"requirements: uv could not resolve them: {result.cause}")
    accepted, conflicts = find_conflicts(python, base, node_files, resolution)
    return ResolveResult(
        pyenv.Resolution([f.path for f in accepted], constraints_file, excludes_file),
        tuple(conflicts),
    )


def find_conflicts(
    python: Path,
    base: RequirementsFile | None,
    node_files: list[RequirementsFile],
    like: pyenv.Resolution,
) -> tuple[list[RequirementsFile], list[Conflict]]:
    """Add the nodes one by one to ComfyUI's requirements: a node that breaks the resolution
    conflicts with ComfyUI or the pins (alone it fails too) or with an earlier node (the first
    one it fails with in a pair). The files that resolve together, and the conflicts."""
    base_files = [base] if base else []
    if base_files and not (result := _resolves(python, base_files, like)).ok:
        raise InstallError(
            f"requirements: ComfyUI's own requirements do not resolve under "
            f"the pins: {result.cause}"
        )
    accepted: list[RequirementsFile] = []
    conflicts: list[Conflict] = []
    for node in node_files:
        if _resolves(python, [*base_files, *accepted, node], like).ok:
            accepted.append(node)
            continue
        other, cause = _conflicts_with(python, base_files, accepted, node, like)
        conflicts.append(
            Conflict(node.owner, f"custom node {node.owner} conflicts with {other}: {cause}")
        )
    return base_files + accepted, conflicts


def _conflicts_with(
    python: Path,
    base_files: list[RequirementsFile],
    accepted: list[RequirementsFile],
    node: RequirementsFile,
    like: pyenv.Resolution,
) -> tuple[str, str]:
    """(what ``node`` conflicts with, uv's cause)."""
    alone = _resolves(python, [*base_files, node], like)
    if not alone.ok:
        return "ComfyUI's requirements or the protected packages", alone.cause
    for earlier in accepted:
        pair = _resolves(python, [*base_files, earlier, node], like)
        if not pair.ok:
            other = f"custom node {earlier.owner}"
            shared = sorted(node.names & earlier.names)
            if shared:
                other += f" (both name {', '.join(shared)})"
            return other, pair.cause
    return "an earlier node", ""
