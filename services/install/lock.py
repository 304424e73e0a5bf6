"""comfy-machine.lock: what the last complete install resolved and installed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.files import atomic_write_text

LOCK_VERSION = 1


@dataclass
class LockedRepo:
    url: str
    ref: str
    commit: str


@dataclass
class LockedNode(LockedRepo):
    enabled: bool = True
    install_py: str = "none"  # "none" (the node has none), "ok" or "failed"
    skipped_reason: str | None = None  # disabled by on_conflict = "skip-node"
    status: str = "ok"  # "ok", "failed", "skipped" or "disabled": a failed node is retried


@dataclass
class Lock:
    inputs_hash: str
    comfyui: LockedRepo
    nodes: dict[str, LockedNode] = field(default_factory=dict)
    python: str = ""
    requirements_hash: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    version: int = LOCK_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Lock:
        data: dict[str, Any] = json.loads(text)
        if data.get("version") != LOCK_VERSION:
            raise ValueError(f"lock version {data.get('version')} is not {LOCK_VERSION}")
        return cls(
            inputs_hash=data["inputs_hash"],
            comfyui=LockedRepo(**data["comfyui"]),
            nodes={k: LockedNode(**v) for k, v in data.get("nodes", {}).items()},
            python=data.get("python", ""),
            requirements_hash=data.get("requirements_hash", ""),
            packages=data.get("packages", {}),
        )


def read_lock(path: Path) -> Lock | None:
    """The lock at ``path``; None if missing or unreadable (then everything is checked anew)."""
    try:
        return Lock.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_lock(path: Path, lock: Lock) -> None:
    """Written last and atomically: a lock on disk always describes a complete install."""
    atomic_write_text(path, lock.to_json())


def digest(value: object) -> str:
    """Stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
