"""Install step for ComfyUI's checkout: git (through gitpython) at a pinned ref, idempotently."""

from __future__ import annotations

import difflib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import git

from machine.errors import InstallError

log = logging.getLogger(__name__)

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
ATTEMPTS = 3


@dataclass(frozen=True)
class CheckoutResult:
    commit: str
    action: str  # "skipped", "cloned" or "updated"


def _with_retries(what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run a network git operation with backoff; the last error is raised."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except git.GitCommandError as exc:
            if attempt == ATTEMPTS:
                raise InstallError(
                    f"{what} failed after {ATTEMPTS} attempts: {_stderr(exc)}"
                ) from None
            log.warning(
                "git retry",
                extra={"fields": {"what": what, "attempt": attempt, "error": _stderr(exc)}},
            )
            time.sleep(0.5 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _stderr(exc: git.GitCommandError) -> str:
    return (str(exc.stderr or exc).strip().splitlines() or ["?"])[-1].strip()


def resolve_ref(url: str, ref: str, what: str) -> str:
    """The commit ``ref`` (commit, tag or branch) names in ``url``; an error lists close refs."""
    if FULL_SHA.match(ref):
        return ref
    out = _with_retries(f"{what}: git ls-remote {url}", git.cmd.Git().ls_remote, url)
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    for candidate in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if candidate in refs:
            return refs[candidate]
    names = sorted(
        {
            n.removeprefix("refs/tags/").removeprefix("refs/heads/").removesuffix("^{}")
            for n in refs
            if n.startswith(("refs/tags/", "refs/heads/"))
        }
    )
    close = difflib.get_close_matches(ref, names, n=5, cutoff=0.3) or names[:5]
    raise InstallError(
        f"{what}: ref {ref!r} not found in {url}; "
        f"nearest branches/tags: {', '.join(close) or 'none'}"
    )


def ensure_checkout(url: str, ref: str, dest: Path, what: str) -> CheckoutResult:
    """Make ``dest`` a clean checkout of ``ref``; skip all work when it already is one."""
    target = resolve_ref(url, ref, what)
    action = (
        _update(url, ref, target, dest, what)
        if dest.exists()
        else _clone(url, ref, target, dest, what)
    )
    # Check what is on disk, not what the commands claimed.
    with git.Repo(dest) as repo:
        head = repo.head.commit.hexsha
    if head != target:
        raise InstallError(f"{what}: after checkout HEAD is {head}, expected {target}")
    return CheckoutResult(target, action)


def _update(url: str, ref: str, target: str, dest: Path, what: str) -> str:
    try:
        repo = git.Repo(dest)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise InstallError(
            f"{what}: {dest} exists but is not a git checkout; move it away or choose "
            "another COMFYUI_INSTALL_PATH"
        ) from None
    # gitpython keeps `git cat-file` helpers per Repo: close it, or they delay the exit.
    with repo:
        modified = [d.a_path for d in repo.index.diff(None)]
        if modified:
            raise InstallError(
                f"{what}: {dest} has modified tracked files ({', '.join(modified[:5])}); "
                "comfy-machine will not overwrite them: commit them to your fork, or "
                f"`git -C {dest} checkout -- .` to drop them"
            )
        if repo.head.is_valid() and repo.head.commit.hexsha == target:
            return "skipped"
        _fetch(repo, url, ref, target, what)
        repo.git.checkout("--detach", target)
    return "updated"


def _clone(url: str, ref: str, target: str, dest: Path, what: str) -> str:
    # Clone beside the destination and rename: a killed clone never looks like a checkout.
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    repo = _with_retries(
        f"{what}: git clone {url}", git.Repo.clone_from, url, partial, no_checkout=True
    )
    with repo:
        if not _has_commit(repo, target):
            _fetch(repo, url, ref, target, what)
        repo.git.checkout("--detach", target)
    partial.rename(dest)
    return "cloned"


def _has_commit(repo: git.Repo, sha: str) -> bool:
    try:
        repo.commit(sha)
    except (ValueError, git.BadName):
        return False
    return True


def _fetch(repo: git.Repo, url: str, ref: str, target: str, what: str) -> None:
    if repo.remotes and repo.remotes[0].url != url:
        repo.remotes[0].set_url(url)
    _with_retries(
        f"{what}: git fetch {url}",
        repo.git.fetch,
        "--tags",
        url,
        "+refs/heads/*:refs/remotes/origin/*",
    )
    if not _has_commit(repo, target):
        raise InstallError(f"{what}: commit {target} ({ref}) is not in {url}")
