"""Custom nodes from the Comfy Registry: which archive an id (and version) is, fetched with the
models' downloader (``.part``, Range resume, retries, sha256 computed in-stream) and unpacked
safely into ``custom_nodes/<name>``; the pin the lock keeps (id, version, URL, sha256).

The registry's API (Comfy-Org/registry-backend ``openapi.yml``, as comfy-cli and
ComfyUI-Manager call it):
- ``GET {COMFY_REGISTRY_URL}/nodes/{nodeId}/install[?version=X]`` -> 200 ``NodeVersion``
  (``id``, ``version``, ``downloadUrl``, ``status``, ``deprecated``, ``node_id``, ...) for that
  version or the latest; 404 ``ErrorResponse`` (``error``, ``message``) for an unknown node or
  version (the same status for both).
- ``GET {COMFY_REGISTRY_URL}/nodes/{nodeId}/versions`` -> 200 ``[NodeVersion]``; 404 for an
  unknown node. Asked only after a 404, to tell an unknown id from an unknown version.
Beside the unpacked node: ComfyUI-Manager's ``.tracking`` (the archive's member names, one a
line), so Manager lists it as an installed registry node, and comfy-machine's ``MARKER`` (id,
version, sha256), so a warm boot checks the tree without asking the registry.

Blocking: each install runs its own event loop (the installer calls it from worker threads)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp

from config.errors import DiskFullError, InstallError
from config.models import ModelSpec, public_url
from config.nodes import registry_version_problem
from services.install.unpack import MAX_UNPACKED_BYTES, staging_root, unpack_zip
from services.models.download import FetchOptions, HttpFetch
from services.models.errors import ChecksumMismatch, ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")
TRACKING = ".tracking"  # ComfyUI-Manager's record of a registry node's files
MARKER = ".comfy-machine.json"  # comfy-machine's: which registry archive this tree is
MAX_JSON_BYTES = 8 << 20
SHOWN_VERSIONS = 10
PROGRESS_EVERY_S = 1.0
REFUSED_STATUSES = ("NodeVersionStatusBanned", "NodeVersionStatusDeleted")
# The versions offered when one is not found: what ComfyUI-Manager lists as installable.
OFFERED_STATUSES = (("statuses", "NodeVersionStatusActive"),
                    ("statuses", "NodeVersionStatusPending"))
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


class RegistryError(InstallError):
    """A registry node cannot be had; the message names the node, COMFY_REGISTRY_URL and what
    to do."""


class _Transient(Exception):
    """A registry answer worth asking again (5xx, 408, 429)."""


@dataclass(frozen=True)
class RegistryPin:
    """What the lock records of an installed registry node."""

    registry_id: str
    version: str
    sha256: str
    download_url: str  # without credentials or query string
    registry_url: str


@dataclass(frozen=True)
class NodeVersion:
    """The registry's answer to the install endpoint (the fields comfy-machine uses)."""

    node_id: str
    version: str
    download_url: str  # as given: only ever shown through public_url


@dataclass(frozen=True)
class RegistryJob:
    """One registry node to have at ``dest``."""

    name: str  # the directory under custom_nodes/
    registry_id: str
    requested: str | None  # the version asked for; None for the latest
    dest: Path
    registry_url: str  # COMFY_REGISTRY_URL, without a trailing '/'
    # The lock's pin when the entry (id, version asked for, registry) is unchanged: kept, and
    # a re-download must have its sha256.
    locked: RegistryPin | None = None
    options: FetchOptions = field(default_factory=FetchOptions)
    max_bytes: int = MAX_UNPACKED_BYTES
    # What is at ``dest`` was installed by comfy-machine (the lock names it): it may be replaced
    # even without a registry node's marks.
    replaceable: bool = False

    @property
    def what(self) -> str:
        return f"custom node {self.name} (registry id {self.registry_id})"


@dataclass(frozen=True)
class RegistryResult:
    pin: RegistryPin
    action: str  # "installed", "replaced" or "skipped"
    detail: str


def registry_intact(dest: Path, pin: RegistryPin) -> bool:
    """``dest`` holds the archive ``pin`` names, unpacked by comfy-machine, with every entry
    the archive had still present (the warm-boot check: no registry request)."""
    if dest.is_symlink() or not dest.is_dir():
        return False
    try:
        marker = json.loads((dest / MARKER).read_text())
        tracking = (dest / TRACKING).read_text().splitlines()
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or (
        marker.get("id"), marker.get("version"), marker.get("sha256")
    ) != (pin.registry_id, pin.version, pin.sha256):
        return False
    for name in tracking:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts or "\0" in name:
            return False
        if parts and not os.path.lexists(dest.joinpath(*parts)):
            return False
    return True


def install_node(job: RegistryJob, progress: Callable[[str], None]) -> RegistryResult:
    """Have ``job``'s node at ``job.dest``: as locked and intact (nothing asked), else resolved
    at the registry, downloaded and unpacked. RegistryError (an InstallError) says why not."""
    if job.locked is not None and registry_intact(job.dest, job.locked):
        pin = job.locked
        return RegistryResult(pin, "skipped", f"skipped: {pin.registry_id} {pin.version} as locked")
    existed = os.path.lexists(job.dest)
    marked = any(os.path.lexists(job.dest / mark) for mark in (MARKER, TRACKING))
    if existed and not (job.replaceable or marked):
        # Not ours, nor a registry node ComfyUI-Manager installed: never replaced unasked.
        raise RegistryError(
            f"{job.what}: custom_nodes/{job.name} already exists and was not installed from the "
            "registry by comfy-machine or ComfyUI-Manager; nothing was changed. Move it away, or "
            "give the node another `name`"
        )
    try:
        version, archive, digest = _run(_fetch(job, progress))
    except OSError as exc:  # the staging directory cannot be made or written, say
        raise RegistryError(f"{job.what}: downloading failed: {exc.strerror or exc} "
                            f"({exc.filename or staging_root(job.dest)})") from None
    try:
        progress(f"unpacking {job.registry_id} {version.version}")
        pin = RegistryPin(job.registry_id, version.version, digest,
                          public_url(version.download_url), job.registry_url)
        names = unpack_zip(archive, job.dest, job.what, max_bytes=job.max_bytes,
                           extra_files=_beside(pin), list_file=TRACKING)
    except OSError as exc:  # a full disk, a permission: the node's failure, named
        raise RegistryError(f"{job.what}: unpacking {job.registry_id} {version.version} into "
                            f"custom_nodes/{job.name} failed: {exc.strerror or exc}; nothing of "
                            "it was installed") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
    action = "replaced" if existed else "installed"
    log.info("registry node installed", extra={"fields": {
        "node": job.name, "id": pin.registry_id, "version": pin.version, "sha256": digest,
        "url": pin.download_url, "entries": len(names)}})
    return RegistryResult(
        pin, action,
        f"{action} {pin.registry_id} {pin.version} from {pin.download_url} (sha256 {digest})",
    )


def _beside(pin: RegistryPin) -> dict[str, str]:
    """comfy-machine's marker, written at the node's top beside the archive's files."""
    marker = {"source": "registry", "id": pin.registry_id, "version": pin.version,
              "sha256": pin.sha256, "download_url": pin.download_url}
    return {MARKER: json.dumps(marker, indent=2) + "\n"}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on an event loop of its own (in a helper thread when this
    thread already runs one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="registry") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _fetch(
    job: RegistryJob, progress: Callable[[str], None]
) -> tuple[NodeVersion, Path, str]:
    """Resolve the version (the locked one, when the tree is to be repaired), download its
    archive checking the locked sha256 if any; (version, archive path, sha256)."""
    ask = job.locked.version if job.locked is not None else job.requested
    progress(f"asking {job.registry_url} for {job.registry_id} {ask or 'latest'}")
    async with aiohttp.ClientSession() as api:
        version = await resolve(api, job.registry_url, job.registry_id, ask, job.options, job.what)
    expected = job.locked.sha256 if job.locked is not None else None
    archive = staging_root(job.dest) / f"{job.name}-{version.version}.zip"
    async with aiohttp.ClientSession(auto_decompress=False) as files:
        digest = await _download(files, job, version, archive, expected, progress)
    return version, archive, digest


async def _download(
    session: aiohttp.ClientSession,
    job: RegistryJob,
    version: NodeVersion,
    archive: Path,
    expected: str | None,
    progress: Callable[[str], None],
) -> str:
    """The archive into ``archive`` through the models' HttpFetch; its sha256."""
    where = public_url(version.download_url)
    spec = ModelSpec(folder="custom_nodes", filename=archive.name, url=version.download_url,
                     size=None, sha256=expected, auth_env=None, required=True,
                     when="before_start", source=job.what)
    done, last = 0, 0.0

    def count(n: int, total: int | None) -> None:
        nonlocal done, last
        done = max(done + n, 0)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            of = f" of {total}" if total else ""
            progress(f"downloading {job.registry_id} {version.version}: {done}{of} bytes")

    progress(f"downloading {job.registry_id} {version.version} from {where}")
    try:
        return await HttpFetch(spec, archive, session, None, count, job.options).run()
    except ChecksumMismatch as exc:
        raise RegistryError(
            f"{job.what}: the archive of {job.registry_id} {version.version} ({where}) has "
            f"sha256 {exc.got}, but the lock recorded {expected} when it was installed: the "
            "registry's archive changed since. It was refused and nothing of it was installed; "
            "pin another version, or delete comfy-machine.lock in the workspace to accept it"
        ) from None
    except (ModelError, DiskFullError) as exc:
        raise RegistryError(
            f"{job.what}: downloading {job.registry_id} {version.version} failed: {exc}"
        ) from None


async def resolve(
    session: aiohttp.ClientSession,
    registry_url: str,
    node_id: str,
    version: str | None,
    options: FetchOptions,
    what: str,
) -> NodeVersion:
    """The registry's ``NodeVersion`` for ``node_id`` at ``version`` (None: the latest)."""
    base = f"{registry_url}/nodes/{quote(node_id, safe='')}"
    params = {"version": version} if version else None
    status, body = await _get_json(session, f"{base}/install", params, options, what,
                                   registry_url)
    if status == 200:
        return _node_version(body, node_id, version, what, registry_url)
    if status == 404:
        listed, versions = await _get_json(session, f"{base}/versions", OFFERED_STATUSES,
                                           options, what, registry_url)
        raise _not_found(node_id, version, listed, versions, what, registry_url)
    raise RegistryError(
        f"{what}: the Comfy Registry at COMFY_REGISTRY_URL={registry_url} answered HTTP "
        f"{status} for {node_id} {version or 'latest'}{_message(body)}"
    )


def _not_found(
    node_id: str, version: str | None, status: int, versions: object, what: str,
    registry_url: str,
) -> RegistryError:
    where = f"the Comfy Registry at COMFY_REGISTRY_URL={registry_url}"
    offered = [v["version"] for v in versions if isinstance(v, dict)
               and isinstance(v.get("version"), str)] if isinstance(versions, list) else []
    if status == 404 or (status != 200 and not offered):
        return RegistryError(
            f"{what}: {where} has no node with id {node_id!r} (HTTP 404); check the id (as "
            "`comfy node install <id>` takes it, shown on the node's registry page), or name "
            "the node by its git URL"
        )
    if version is None or not offered:
        return RegistryError(f"{what}: {where} has no installable version of {node_id}; pin a "
                             "version it lists, or name the node by its git URL")
    if version in offered:
        return RegistryError(f"{what}: {where} lists {node_id} {version} but would not give "
                             "it for installing (HTTP 404); pin another version")
    nearest = nearest_first(version, offered)
    more = len(nearest) - SHOWN_VERSIONS
    shown = ", ".join(nearest[:SHOWN_VERSIONS]) + (f" (and {more} more)" if more > 0 else "")
    return RegistryError(
        f"{what}: {where} has no version {version!r} of {node_id}; versions offered, nearest "
        f"first: {shown}. Set the version to one of them, or leave it out for the latest"
    )


def _numbers(version: str) -> tuple[int, int, int]:
    core = version.lstrip("v").split("+", 1)[0].split("-", 1)[0]
    found = [int(n) for n in re.findall(r"[0-9]+", core)[:3]]
    major, minor, patch = [*found, 0, 0, 0][:3]
    return major, minor, patch


def nearest_first(requested: str, offered: list[str]) -> list[str]:
    """``offered`` (without repeats) ordered by closeness to ``requested``: the major version
    first, then minor, then patch; of two as close, the newer first."""
    want = _numbers(requested)

    def key(version: str) -> tuple[tuple[int, ...], tuple[int, ...], str]:
        have = _numbers(version)
        return tuple(abs(a - b) for a, b in zip(have, want, strict=True)), tuple(
            -n for n in have
        ), version

    return sorted(dict.fromkeys(offered), key=key)


def _node_version(
    body: object, node_id: str, version: str | None, what: str, registry_url: str
) -> NodeVersion:
    """A NodeVersion from the install endpoint's JSON, checked: a version the lock and a file
    name can hold, the one asked for, and an http(s) archive URL."""
    where = f"the Comfy Registry at COMFY_REGISTRY_URL={registry_url}"
    if not isinstance(body, dict):
        raise RegistryError(f"{what}: {where} answered {node_id} with something that is not a "
                            "NodeVersion (JSON object); is COMFY_REGISTRY_URL the registry API?")
    got = body.get("version")
    if not isinstance(got, str) or registry_version_problem(got):
        raise RegistryError(f"{what}: {where} answered {node_id} with the version "
                            f"{str(got)[:80]!r}, which is not a version; nothing was installed")
    if version is not None and got != version:
        raise RegistryError(f"{what}: {where} answered {node_id} {version} with version {got}; "
                            "nothing was installed")
    status = body.get("status")
    if status in REFUSED_STATUSES:
        reason = _message({"message": body.get("status_reason")})
        state = str(status).removeprefix("NodeVersionStatus").lower()
        raise RegistryError(
            f"{what}: {node_id} {got} is {state} in the registry{reason}; pin another version"
        )
    url = body.get("downloadUrl")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"{what}: {where} gave no http(s) download URL for {node_id} {got} "
                            "(downloadUrl); nothing was installed")
    return NodeVersion(node_id, got, str(url))


def _message(body: object) -> str:
    """``: <message>`` of an ErrorResponse, printable and bounded; "" when there is none."""
    text = body.get("message") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        return ""
    return ": " + _UNPRINTABLE.sub(" ", text).strip()[:200]


async def _get_json(
    session: aiohttp.ClientSession,
    url: str,
    params: Any,
    options: FetchOptions,
    what: str,
    registry_url: str,
) -> tuple[int, object]:
    """(status, JSON body or None) of a GET, asked again with backoff while the registry cannot
    be reached or answers 5xx, 408 or 429; RegistryError naming COMFY_REGISTRY_URL after the
    last retry."""
    timeout = aiohttp.ClientTimeout(total=options.read_timeout_s,
                                    sock_connect=options.connect_timeout_s)
    attempt = 0
    while True:
        try:
            async with session.get(url, params=params, timeout=timeout,
                                   headers={"Accept": "application/json"}) as resp:
                if resp.status >= 500 or resp.status in (408, 429):
                    raise _Transient(f"HTTP {resp.status}")
                raw = await resp.content.read(MAX_JSON_BYTES + 1)
                if len(raw) > MAX_JSON_BYTES:
                    raise RegistryError(f"{what}: the answer of COMFY_REGISTRY_URL="
                                        f"{registry_url} is larger than {MAX_JSON_BYTES} bytes")
                try:
                    body = json.loads(raw) if raw else None
                except (ValueError, RecursionError):
                    body = None
                if resp.status == 200 and body is None:
                    raise RegistryError(
                        f"{what}: COMFY_REGISTRY_URL={registry_url} answered {resp.status} "
                        "without JSON; is it the Comfy Registry's API (e.g. "
                        "https://api.comfy.org)?"
                    )
                return resp.status, body
        except (aiohttp.ClientError, TimeoutError, ConnectionError, _Transient) as exc:
            attempt += 1
            cause = str(exc) if isinstance(exc, _Transient) else type(exc).__name__
            if attempt > options.retries:
                raise RegistryError(
                    f"{what}: the Comfy Registry at COMFY_REGISTRY_URL={registry_url} could not "
                    f"be reached: gave up after {attempt} attempts (last: {cause}); check "
                    "COMFY_REGISTRY_URL and the network, or name the node by its git URL",
                    transient=True,
                ) from None
            delay = min(options.backoff_s * 2 ** (attempt - 1), options.backoff_max_s)
            log.warning("registry request retry", extra={"fields": {
                "url": public_url(url), "attempt": attempt, "error": cause,
                "retry_in_s": delay}})
            await asyncio.sleep(delay)
