"""Custom-node specs from COMFYUI_CUSTOM_NODES, the TOML file and a ComfyUI-Manager snapshot.

A node comes from git (a URL or path, optionally ``@ref``) or from the Comfy Registry (an id,
optionally ``@version``: what ``comfy node install`` and ComfyUI-Manager's "cnr" nodes name).
Pure: text and dicts in, validated specs or Problems out (the snapshot file is read by the
caller)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from config.errors import Problem
from config.git_input import GitAuth, redact_urls, ref_problem, split_userinfo, url_problem
from config.models import ENV_NAME

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# The Comfy Registry's API (COMFY_REGISTRY_URL), as comfy-cli and ComfyUI-Manager use it.
DEFAULT_REGISTRY_URL = "https://api.comfy.org"
# The registry's node-id rule (registry-backend mapper.IsValidNodeID): 1-100 ASCII letters,
# digits, '_', '-', '.', starting and ending with a letter or digit; ids are stored lower case.
REGISTRY_ID = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,98}[a-z0-9])?$")
# A published version: semver-ish (1.2.3, 1.2, 1.2.3-beta.1+build), as the registry lists it.
REGISTRY_VERSION = re.compile(
    r"^v?[0-9]+(?:\.[0-9]+){0,3}(?:-[0-9A-Za-z][0-9A-Za-z.-]*)?(?:\+[0-9A-Za-z][0-9A-Za-z.-]*)?$"
)
LATEST = "latest"  # the ref of a registry node given without a version
GIT, REGISTRY = "git", "registry"


class CustomNodeEntry(BaseModel):
    """One ``[[custom_nodes]]`` table of the TOML file."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="a git repository (or `id` instead)")
    ref: str | None = Field(None, description="commit, tag or branch; default: the remote HEAD")
    id: str | None = Field(None, description="a Comfy Registry node id (instead of `url`)")
    version: str | None = Field(None, description="a registry version; default: the latest")
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
    # "git", or "registry": then url is "" (the registry gives the archive's URL), ref is the
    # version asked for ("latest" when none) and registry_id the node's registry id.
    kind: str = GIT
    registry_id: str | None = None

    @property
    def requested_version(self) -> str | None:
        """The registry version asked for; None for the latest."""
        return None if self.ref == LATEST else self.ref

    def describe(self) -> str:
        """How the node was named: its git URL, or ``registry id <id>``."""
        return f"registry id {self.registry_id}" if self.kind == REGISTRY else self.url


def name_from_url(url: str) -> str:
    """The directory name git would give the clone: the last path part without ``.git``."""
    tail = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail.removesuffix(".git")


def is_registry_form(item: str) -> bool:
    """``item`` is neither a URL nor a path (no '/', ':' or '\\'; not '.' or '..'): it names a
    Comfy Registry node by id."""
    return bool(item) and not any(c in item for c in "/:\\") and item not in (".", "..")


def parse_env_list(text: str) -> list[tuple[str, str | None]]:
    """``url[@ref],id[@version],...`` -> [(url or id, ref or version)]; the ref is after the last
    ``@`` of the path, the version after the ``@`` of an id."""
    items = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        url, ref = item, None
        # An '@' in the path part is a ref; one before the host (user@host) is not.
        head, sep, tail = item.rpartition("@")
        if sep and "/" not in tail and (
            "/" in head or head.startswith("file:") or is_registry_form(head)
        ):
            url, ref = head, tail or None
        items.append((url, ref))
    return items


def registry_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be COMFY_REGISTRY_URL; None if it can."""
    fix = f"give the registry API's base URL, e.g. {DEFAULT_REGISTRY_URL}"
    if _CONTROL_OR_SPACE.search(url):
        return f"contains spaces or control characters; {fix}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"is not an http(s) URL with a host; {fix}"
    if "@" in parts.netloc:
        return f"carries credentials; the registry is public: {fix}"
    if parts.query or parts.fragment:
        return f"has a query or fragment; {fix}"
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return f"has an invalid port; {fix}"
    return None


def registry_id_problem(node_id: str) -> str | None:
    """Why ``node_id`` (lower-cased) is not a Comfy Registry node id; None if it is one."""
    if not REGISTRY_ID.match(node_id):
        return (
            "is not a Comfy Registry node id (1-100 lower-case letters, digits, '-', '_', '.', "
            "starting and ending with a letter or digit; no '/' or path parts): give the id as "
            "`comfy node install <id>` takes it (e.g. comfyui-impact-pack), or a git URL"
        )
    return None


def registry_version_problem(version: str) -> str | None:
    """Why ``version`` is not a version the registry could list; None if it could be."""
    if len(version) > 64 or not REGISTRY_VERSION.match(version):
        return (
            "is not a registry version (semver, e.g. 1.2.3 or 1.2.3-beta.1); give a version "
            "the registry lists for the node, or none for the latest"
        )
    return None


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
    cnr_nodes = snapshot.get("cnr_custom_nodes") or {}
    if not isinstance(cnr_nodes, dict):
        return None, [], [Problem(f"{source} cnr_custom_nodes", type(cnr_nodes).__name__,
                                  "cnr_custom_nodes must map registry id -> version")]
    for node_id, version in cnr_nodes.items():
        if not isinstance(version, str) or not version:
            problems.append(Problem(f"{source} cnr_custom_nodes", str(node_id),
                                    "each entry needs a version string (e.g. \"1.2.3\")"))
            continue
        entries.append(CustomNodeEntry(id=str(node_id), version=version))
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


def _env_entry(item: str, ref: str | None) -> CustomNodeEntry:
    """One COMFYUI_CUSTOM_NODES item: a registry id when it is neither a URL nor a path."""
    if is_registry_form(item):
        return CustomNodeEntry(id=item, version=ref)
    return CustomNodeEntry(url=item, ref=ref)


def _same_node(a: CustomNodeSpec, b: CustomNodeSpec) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == REGISTRY:
        return a.registry_id == b.registry_id
    return a.url.rstrip("/").removesuffix(".git") == b.url.rstrip("/").removesuffix(".git")


def _name_problem(source: str, name: str) -> Problem | None:
    if SAFE_NAME.match(name) and name not in (".", ".."):
        return None
    return Problem(f"{source} name", name, "must be a plain directory name inside custom_nodes/ "
                   "(letters, digits, '.', '_', '-'; no '/' or '..')")


def _registry_spec(source: str, entry: CustomNodeEntry) -> CustomNodeSpec | Problem:
    """The spec of a registry entry (``id``, optional ``version``), or what is wrong with it."""
    if entry.ref is not None:
        return Problem(f"{source} ref", entry.ref,
                       "a registry node (`id`) takes `version`, not `ref` (a git ref)")
    if entry.auth_env is not None:
        return Problem(f"{source} auth_env", entry.auth_env,
                       "registry nodes are public: auth_env only applies to a git `url`")
    node_id = (entry.id or "").strip().lower()
    bad_id = registry_id_problem(node_id)
    if bad_id:
        return Problem(f"{source} id", entry.id or "", bad_id)
    version = None if entry.version in (None, LATEST) else entry.version
    bad_version = registry_version_problem(version) if version is not None else None
    if bad_version:
        return Problem(f"{source} version", version or "", bad_version)
    name = entry.name or node_id
    return _name_problem(source, name) or CustomNodeSpec(
        name=name, url="", ref=version or LATEST, required=entry.required,
        enabled=entry.enabled, source=source, kind=REGISTRY, registry_id=node_id)


def _git_spec(
    source: str, raw_entry: CustomNodeEntry
) -> tuple[CustomNodeSpec, str | None] | Problem:
    """The spec of a git entry (``url``, optional ``ref``) and the userinfo its URL carried,
    or what is wrong with it."""
    if raw_entry.version is not None:
        return Problem(f"{source} version", raw_entry.version,
                       "a git node (`url`) takes `ref` (commit, tag or branch), not `version`")
    # Credentials in the URL never go further than here: the spec gets the URL without.
    url, userinfo = split_userinfo(raw_entry.url or "")
    entry = raw_entry.model_copy(update={"url": url})
    bad_url = url_problem(url)
    if bad_url:
        return Problem(source, redact_urls(raw_entry.url or ""), bad_url)
    if entry.auth_env is not None and not ENV_NAME.match(entry.auth_env):
        return Problem(f"{source} auth_env", entry.auth_env,
                       "must be an environment variable name (letters, digits, "
                       "'_'; not starting with a digit)")
    bad_ref = ref_problem(entry.ref) if entry.ref is not None else None
    if bad_ref:
        return Problem(f"{source} ref", entry.ref or "", bad_ref)
    name = entry.name or name_from_url(url)
    bad_name = _name_problem(source, name)
    if bad_name:
        return bad_name
    spec = CustomNodeSpec(name=name, url=url, ref=entry.ref or "HEAD",
                          required=entry.required, enabled=entry.enabled, source=source)
    return spec, userinfo


def _build(
    env_text: str, toml_entries: list[CustomNodeEntry], snapshot_entries: list[CustomNodeEntry],
    snapshot_source: str,
) -> tuple[list[CustomNodeSpec], list[Problem], dict[str, GitAuth]]:
    declared: list[tuple[str, CustomNodeEntry]] = [
        (snapshot_source, e) for e in snapshot_entries
    ] + [(f"custom_nodes[{i}]", e) for i, e in enumerate(toml_entries)] + [
        ("COMFYUI_CUSTOM_NODES", _env_entry(u, r)) for u, r in parse_env_list(env_text)
    ]
    problems: list[Problem] = []
    by_name: dict[str, CustomNodeSpec] = {}
    origin: dict[str, str] = {}
    auth: dict[str, GitAuth] = {}
    for source, entry in declared:
        if (entry.url is None) == (entry.id is None):
            both = entry.url is not None
            problems.append(Problem(
                source, redact_urls(entry.url or "") if both else "",
                "gives both `url` and `id`; a node comes from git (`url`, `ref`) or from the "
                "Comfy Registry (`id`, `version`), not both" if both else
                "needs `url` (a git repository, with `ref`) or `id` (a Comfy Registry node, "
                "with `version`)"))
            continue
        userinfo = None
        if entry.id is not None:
            built = _registry_spec(source, entry)
            if isinstance(built, Problem):
                problems.append(built)
                continue
            spec = built
        else:
            git_built = _git_spec(source, entry)
            if isinstance(git_built, Problem):
                problems.append(git_built)
                continue
            spec, userinfo = git_built
        name = spec.name
        if name in by_name and not _same_node(by_name[name], spec):
            problems.append(Problem(
                f"{source} name", name,
                f"two different nodes would share custom_nodes/{name} ({by_name[name].describe()} "
                f"from {origin[name]} and {spec.describe()}); give one a different `name`"))
            continue
        by_name[name] = spec  # a later source (env over TOML over snapshot) wins
        origin[name] = source
        auth.pop(name, None)
        if userinfo or entry.auth_env:
            auth[name] = GitAuth(userinfo=userinfo, token_env=entry.auth_env)
    return list(by_name.values()), problems, auth
