"""comfy-machine.lock: what the last complete install resolved and installed."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from services.files import atomic_write_text
from services.state import NodeStatus

log = logging.getLogger(__name__)

LOCK_VERSION = 1
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SOURCES = ("git", "registry")


class LockFormatError(ValueError):
    """The lock's text is not a lock this version wrote (the reason, never its content)."""


class ScriptStatus(StrEnum):
    """How a custom node's install.py went, as locked."""

    NONE = "none"  # the node has none
    OK = "ok"
    FAILED = "failed"


@dataclass
class LockedRepo:
    url: str
    ref: str
    commit: str


@dataclass
class LockedNode(LockedRepo):
    enabled: bool = True
    install_py: ScriptStatus = ScriptStatus.NONE
    skipped_reason: str | None = None  # disabled by on_conflict = "skip-node"
    status: NodeStatus = NodeStatus.OK  # a failed node is retried
    # A Comfy Registry node: source "registry", url the archive's (without credentials or
    # query), ref the version asked for ("latest" when none), commit "" and the pin here.
    source: str = "git"
    registry_id: str | None = None
    version: str | None = None  # the version installed
    sha256: str | None = None  # of its archive: a re-download must match it
    registry_url: str | None = None  # COMFY_REGISTRY_URL it was resolved at

    def __post_init__(self) -> None:
        # Read back from JSON as plain strings; an unknown value makes the lock unreadable.
        self.install_py = ScriptStatus(self.install_py)
        self.status = NodeStatus(self.status)
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}")


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
        """The lock in ``text``; LockFormatError for anything but the shape written here."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LockFormatError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise LockFormatError("nested too deeply") from None
        lock = _expect(data, dict, "the lock")
        if lock.get("version") != LOCK_VERSION:
            raise LockFormatError(f"version is not {LOCK_VERSION}")
        nodes = _expect(lock.get("nodes", {}), dict, "nodes")
        return cls(
            inputs_hash=_expect(lock.get("inputs_hash"), str, "inputs_hash"),
            comfyui=_repo(LockedRepo, lock.get("comfyui"), "comfyui"),
            nodes={
                _expect(name, str, "a node name"): _repo(LockedNode, value, f"nodes.{name}")
                for name, value in nodes.items()
            },
            python=_expect(lock.get("python", ""), str, "python"),
            requirements_hash=_expect(lock.get("requirements_hash", ""), str, "requirements_hash"),
            packages={
                _expect(k, str, "a package"): _expect(v, str, f"packages.{k}")
                for k, v in _expect(lock.get("packages", {}), dict, "packages").items()
            },
        )


def _expect(value: object, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LockFormatError(f"{what} is not a JSON {kind.__name__}")
    return value


def _repo(cls: type[LockedRepo], value: object, what: str) -> Any:
    """A LockedRepo or LockedNode from ``value``: known keys of the right types only, and a
    commit that is a full commit id (or empty for a node that failed)."""
    data = _expect(value, dict, what)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise LockFormatError(f"{what} has unknown keys")
    for key in ("url", "ref", "commit"):
        _expect(data.get(key), str, f"{what}.{key}")
    if "enabled" in data:
        _expect(data["enabled"], bool, f"{what}.enabled")
    for key in ("skipped_reason", "source", "registry_id", "version", "sha256", "registry_url"):
        if data.get(key) is not None:
            _expect(data[key], str, f"{what}.{key}")
    if data.get("sha256") is not None and not SHA256.match(data["sha256"]):
        raise LockFormatError(f"{what}.sha256 is not a sha256")
    commit = data["commit"]
    if not COMMIT.match(commit) and not (cls is LockedNode and commit == ""):
        raise LockFormatError(f"{what}.commit is not a commit id")
    try:
        return cls(**data)
    except (TypeError, ValueError):  # an unknown install_py or status
        raise LockFormatError(f"{what} has an unknown status") from None


def read_lock(path: Path) -> Lock | None:
    """The lock at ``path``; None if missing or unreadable (then everything is checked anew
    and the lock rebuilt). Garbage of any shape is a warning, never an error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("lock unreadable, rebuilding it",
                    extra={"fields": {"path": str(path), "error": exc.strerror}})
        return None
    try:
        return Lock.from_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except LockFormatError as exc:
        reason = str(exc)
    log.warning("lock unreadable, rebuilding it",
                extra={"fields": {"path": str(path), "error": reason}})
    return None


def write_lock(path: Path, lock: Lock) -> None:
    """Written last and atomically: a lock on disk always describes a complete install."""
    atomic_write_text(path, lock.to_json())


def digest(value: object) -> str:
    """Stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
