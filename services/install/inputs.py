"""What the install depends on (InstallInputs), and whether the lock was written for it: light
to import, so a warm boot decides before the installer, git and HTTP clients are loaded."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from config.git_input import GitAuth, split_userinfo
from config.nodes import DEFAULT_REGISTRY_URL, REGISTRY, CustomNodeSpec
from services.install.lock import digest, read_lock
from services.install.unpack import MAX_UNPACKED_BYTES
from services.models.options import FetchOptions
from services.state import NodeStatus

if TYPE_CHECKING:
    from services.install.git import GitOptions

LOCK_NAME = "comfy-machine.lock"


@dataclass(frozen=True)
class InstallInputs:
    """Everything the install depends on; its hash keys the lock."""

    comfyui_url: str
    comfyui_ref: str
    install_path: Path
    nodes: tuple[CustomNodeSpec, ...]
    python: Path
    venv: Path | None
    base_python: str
    protected: tuple[str, ...]
    on_conflict: str
    install_py_timeout: float
    workers: int
    workspace: Path
    min_free_bytes: int
    git_timeout: float = 120.0  # GIT_TIMEOUT
    git_retries: int = 2  # GIT_RETRIES
    # Credentials, apart from the URLs (which are shown and locked): ComfyUI's, and each
    # node's by name. A URL given with userinfo has it moved here (__post_init__).
    comfyui_auth: GitAuth | None = None
    node_auth: dict[str, GitAuth] = field(default_factory=dict, repr=False, compare=False)
    # Variables custom nodes' install.py do not inherit (the instances' withheld secrets).
    withheld_env: frozenset[str] = frozenset()
    # Registry nodes: COMFY_REGISTRY_URL; retries and timeouts of its requests and of the
    # archive downloads (DOWNLOAD_RETRIES); the cap on what one archive unpacks to.
    registry_url: str = DEFAULT_REGISTRY_URL
    registry_options: FetchOptions = field(default_factory=FetchOptions)
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES

    def __post_init__(self) -> None:
        # No credentials in a URL past this point: they would reach the lock, health, logs.
        url, userinfo = split_userinfo(self.comfyui_url)
        if userinfo:
            object.__setattr__(self, "comfyui_url", url)
            object.__setattr__(
                self, "comfyui_auth", replace(self.comfyui_auth or GitAuth(), userinfo=userinfo)
            )
        nodes, auth = [], dict(self.node_auth)
        for spec in self.nodes:
            url, userinfo = split_userinfo(spec.url)
            if userinfo:
                spec = replace(spec, url=url)
                auth[spec.name] = replace(auth.get(spec.name) or GitAuth(), userinfo=userinfo)
            nodes.append(spec)
        object.__setattr__(self, "nodes", tuple(nodes))
        object.__setattr__(self, "node_auth", auth)
        object.__setattr__(self, "registry_url", self.registry_url.rstrip("/"))

    def git_options(self, auth: GitAuth | None) -> GitOptions:
        """GIT_TIMEOUT, GIT_RETRIES and the Authorization header of ``auth`` (read now)."""
        from services.install.git import GitOptions, authorization  # gitpython: install only

        return GitOptions(self.git_timeout, self.git_retries, authorization(auth))

    @property
    def lock_path(self) -> Path:
        return self.workspace / LOCK_NAME

    @property
    def custom_nodes_dir(self) -> Path:
        return self.install_path / "custom_nodes"

    def digest(self) -> str:
        return digest(
            {
                "comfyui": [self.comfyui_url, self.comfyui_ref, str(self.install_path)],
                "nodes": [
                    [n.name, n.url, n.ref, n.enabled]
                    + ([n.kind, n.registry_id, self.registry_url] if n.kind == REGISTRY else [])
                    for n in self.nodes
                ],
                "python": str(self.python),
                "protected": sorted(self.protected),
                "on_conflict": self.on_conflict,
            }
        )


def default_base_python() -> str:
    """The interpreter a managed virtualenv is built from: the agent's own version."""
    return sys.executable


def lock_matches(inputs: InstallInputs) -> bool:
    """The lock was written for these very inputs and no node of it failed: a warm boot, if
    what is on disk still matches it (Installer.verify)."""
    lock = read_lock(inputs.lock_path)
    return bool(lock and lock.inputs_hash == inputs.digest()
                and not any(n.status == NodeStatus.FAILED for n in lock.nodes.values()))
