"""Requirement files of ComfyUI and custom nodes: read and checked line by line (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from config.errors import Problem

# Lines uv understands that are not PEP 508 requirements.
PASS_THROUGH = ("-r ", "-c ", "-e ", "--", "git+", "http://", "https://", "file:")


@dataclass(frozen=True)
class RequirementsFile:
    owner: str  # "ComfyUI" or the custom node's name
    path: Path
    names: frozenset[str]  # normalized project names it asks for (for conflict reports)


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
