"""Custom-node specs from COMFYUI_CUSTOM_NODES, the TOML file and a ComfyUI-Manager snapshot.

Pure: text and dicts in, validated specs or Problems out (the snapshot file is read by the
caller)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from config.errors import Problem
from config.git_input import GitAuth, redact_urls, ref_problem, split_userinfo, url_problem
from config.models import ENV_NAME

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CustomNodeEntry(BaseModel):
    """One ``[[custom_nodes]]`` table of the TOML file."""

    model_config = ConfigDict(extra="forbid")

    url: str
    ref: str | None = Field(None, description="commit, tag or branch; default: the remote HEAD")
    name: str | None = None
    required: bool = False
    enabled: bool = True
    auth_env: str | None = Field(
        None, description="environment variable holding a token for a private repository"
    )


@dataclass(frozen=True)
class CustomNodeSpec:
    """A custom node to install under ``custom_nodes/<name>``."""

    name: str
    url: str  # without credentials: shown in health, the lock, logs (see build_node_auth)
    ref: str  # "HEAD" when none was given: resolved to a commit and recorded in the lock
    required: bool
    enabled: bool
    source: str  # where it was declared, for error messages


def name_from_url(url: str) -> str:
    """The directory name git would give the clone: the last path part without ``.git``."""
    tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail.removesuffix(".git")


def parse_env_list(text: str) -> list[tuple[str, str | None]]:
    """``url[@ref],url[@ref]`` -> [(url, ref)]; the ref is after the last ``@`` of the path."""
    items = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        url, ref = item, None
        # An '@' in the path part is a ref; one before the host (user@host) is not.
        head, sep, tail = item.rpartition("@")
        if sep and "/" not in tail and ("/" in head or head.startswith("file:")):
            url, ref = head, tail or None
        items.append((url, ref))
    return items


def snapshot_nodes(snapshot: dict[str, Any], source: str) -> tuple[
    str | None, list[CustomNodeEntry], list[Problem]
]:
    """ComfyUI-Manager snapshot -> (ComfyUI commit, node entries, problems)."""
    problems: list[Problem] = []
    entries = []
    git_nodes = snapshot.get("git_custom_nodes") or {}
    if not isinstance(git_nodes, dict):
        return None, [], [Problem(source, type(git_nodes).__name__,
                                  "git_custom_nodes must map URL -> {hash, disabled}")]
    for url, info in git_nodes.items():
        if not isinstance(info, dict) or not info.get("hash"):
            problems.append(Problem(f"{source} git_custom_nodes", url,
                                    "each entry needs a 'hash' (the commit to install)"))
            continue
        entries.append(CustomNodeEntry(url=url, ref=str(info["hash"]),
                                       enabled=not info.get("disabled", False)))
    for node_id in snapshot.get("cnr_custom_nodes") or {}:
        problems.append(Problem(
            f"{source} cnr_custom_nodes", str(node_id),
            "registry (CNR) nodes are not installed by comfy-machine yet; list the node's git "
            "URL with a commit under [[custom_nodes]] instead"))
    comfyui = snapshot.get("comfyui")
    return (str(comfyui) if comfyui else None), entries, problems


def build_specs(
    env_text: str, toml_entries: list[CustomNodeEntry], snapshot_entries: list[CustomNodeEntry],
    snapshot_source: str = "custom_nodes_snapshot",
) -> tuple[list[CustomNodeSpec], list[Problem]]:
    """Merge the three inputs (env wins over TOML over snapshot, matched by name) and validate.

    A spec's URL carries no credentials; build_node_auth has them."""
    specs, problems, _ = _build(env_text, toml_entries, snapshot_entries, snapshot_source)
    return specs, problems


def build_node_auth(
    env_text: str, toml_entries: list[CustomNodeEntry], snapshot_entries: list[CustomNodeEntry],
    snapshot_source: str = "custom_nodes_snapshot",
) -> dict[str, GitAuth]:
    """Node name -> the credentials its git URL was given with (userinfo) or its auth_env,
    for the nodes that have any. Kept apart from the specs, which are shown."""
    return _build(env_text, toml_entries, snapshot_entries, snapshot_source)[2]


def _build(
    env_text: str, toml_entries: list[CustomNodeEntry], snapshot_entries: list[CustomNodeEntry],
    snapshot_source: str,
) -> tuple[list[CustomNodeSpec], list[Problem], dict[str, GitAuth]]:
    declared: list[tuple[str, CustomNodeEntry]] = [
        (snapshot_source, e) for e in snapshot_entries
    ] + [(f"custom_nodes[{i}]", e) for i, e in enumerate(toml_entries)] + [
        ("COMFYUI_CUSTOM_NODES", CustomNodeEntry(url=u, ref=r))
        for u, r in parse_env_list(env_text)
    ]
    problems: list[Problem] = []
    by_name: dict[str, CustomNodeSpec] = {}
    origin: dict[str, str] = {}
    auth: dict[str, GitAuth] = {}
    for source, raw_entry in declared:
        # Credentials in the URL never go further than here: the spec gets the URL without.
        url, userinfo = split_userinfo(raw_entry.url)
        entry = raw_entry.model_copy(update={"url": url})
        bad_url = url_problem(entry.url)
        if bad_url:
            problems.append(Problem(source, redact_urls(raw_entry.url), bad_url))
            continue
        if entry.auth_env is not None and not ENV_NAME.match(entry.auth_env):
            problems.append(Problem(f"{source} auth_env", entry.auth_env,
                                    "must be an environment variable name (letters, digits, "
                                    "'_'; not starting with a digit)"))
            continue
        bad_ref = ref_problem(entry.ref) if entry.ref is not None else None
        if bad_ref:
            problems.append(Problem(f"{source} ref", entry.ref or "", bad_ref))
            continue
        name = entry.name or name_from_url(entry.url)
        if not SAFE_NAME.match(name) or name in (".", ".."):
            problems.append(Problem(f"{source} name", name,
                                    "must be a plain directory name inside custom_nodes/ "
                                    "(letters, digits, '.', '_', '-'; no '/' or '..')"))
            continue
        spec = CustomNodeSpec(name=name, url=entry.url, ref=entry.ref or "HEAD",
                              required=entry.required, enabled=entry.enabled, source=source)
        if name in by_name and by_name[name].url.rstrip("/").removesuffix(".git") != (
            entry.url.rstrip("/").removesuffix(".git")
        ):
            problems.append(Problem(
                f"{source} name", name,
                f"two different nodes would share custom_nodes/{name} ({by_name[name].url} "
                f"from {origin[name]} and {entry.url}); give one a different `name`"))
            continue
        by_name[name] = spec  # a later source (env over TOML over snapshot) wins
        origin[name] = source
        auth.pop(name, None)
        if userinfo or entry.auth_env:
            auth[name] = GitAuth(userinfo=userinfo, token_env=entry.auth_env)
    return list(by_name.values()), problems, auth
