"""Git checkouts through gitpython at a pinned commit: resolve, clone (shallow where the ref
allows), update, check what is on disk. Idempotent; a half-done clone is never taken as done."""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import git

from config.errors import InstallError

log = logging.getLogger(__name__)

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
ATTEMPTS = 3
T = TypeVar("T")


@dataclass(frozen=True)
class CheckoutResult:
    commit: str
    action: str  # "skipped", "cloned" or "updated"
    stashed: bool = False  # local edits were saved with `git stash` before the checkout


def _stderr(exc: git.GitCommandError) -> str:
    return (str(exc.stderr or exc).strip().splitlines() or ["?"])[-1].strip()


def with_retries(what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a network git operation with exponential backoff; the last error is raised."""
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


def resolve_ref(url: str, ref: str, what: str) -> str:
    """The commit ``ref`` (commit, tag, branch or HEAD) names in ``url``; errors list close refs."""
    if FULL_SHA.match(ref):
        return ref
    out = with_retries(f"{what}: git ls-remote {url}", git.cmd.Git().ls_remote, url)
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


def head_commit(dest: Path) -> str | None:
    """The commit checked out at ``dest``, or None if it is not a git checkout."""
    try:
        with git.Repo(dest) as repo:
            return repo.head.commit.hexsha if repo.head.is_valid() else None
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return None


def checkout_intact(dest: Path, commit: str) -> bool:
    """``dest`` has ``commit`` checked out and no modified tracked file (the warm-boot check)."""
    try:
        with git.Repo(dest) as repo:
            return (
                repo.head.is_valid()
                and repo.head.commit.hexsha == commit
                and not repo.is_dirty(index=True, working_tree=True, untracked_files=False)
            )
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return False


def ensure_checkout(
    url: str, ref: str, dest: Path, what: str, target: str | None = None
) -> CheckoutResult:
    """Make ``dest`` a clean checkout of ``ref`` (or of ``target``, already resolved)."""
    target = target or resolve_ref(url, ref, what)
    if dest.exists():
        action, stashed = _update(url, ref, target, dest, what)
    else:
        action, stashed = _clone(url, ref, target, dest, what), False
    # Check what is on disk, not what the commands claimed.
    head = head_commit(dest)
    if head != target:
        raise InstallError(f"{what}: after checkout HEAD is {head}, expected {target}")
    return CheckoutResult(target, action, stashed)


def _update(url: str, ref: str, target: str, dest: Path, what: str) -> tuple[str, bool]:
    try:
        repo = git.Repo(dest)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise InstallError(
            f"{what}: {dest} exists but is not a git checkout; move it away and boot again"
        ) from None
    # gitpython keeps `git cat-file` helpers per Repo: close it, or they delay the exit.
    with repo:
        stashed = False
        if repo.is_dirty(index=True, working_tree=True, untracked_files=False):
            # Loses nothing: the edits stay in `git stash list` of that checkout.
            repo.git.stash("push", "-m", f"comfy-machine: local edits before checkout of {target}")
            stashed = True
            log.warning("stashed local edits", extra={"fields": {"what": what, "path": str(dest)}})
        if repo.head.is_valid() and repo.head.commit.hexsha == target:
            return ("updated" if stashed else "skipped"), stashed
        if repo.remotes and repo.remotes[0].url != url:
            repo.remotes[0].set_url(url)
        _fetch(repo, url, ref, target, what)
        repo.git.checkout("--detach", target)
        _submodules(repo, what)
    return "updated", stashed


def _clone(url: str, ref: str, target: str, dest: Path, what: str) -> str:
    # Clone beside the destination and rename: a killed clone never looks like a checkout.
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(partial)
    with repo:
        repo.create_remote("origin", url)
        _fetch(repo, url, ref, target, what)
        repo.git.checkout("--detach", target)
        _submodules(repo, what)
    partial.rename(dest)
    return "cloned"


def _has_commit(repo: git.Repo, sha: str) -> bool:
    try:
        repo.commit(sha)
    except (ValueError, git.BadName):
        return False
    return True


def _fetch(repo: git.Repo, url: str, ref: str, target: str, what: str) -> None:
    """Fetch ``target`` as shallowly as the server allows, falling back to a full fetch."""
    if _has_commit(repo, target):
        return
    # Most hosts serve a commit by id at depth 1; tags and branches always can be.
    wanted = target if FULL_SHA.match(ref) or ref == "HEAD" else ref
    with contextlib.suppress(git.GitCommandError):
        repo.git.fetch("--depth", "1", "origin", wanted)
    if not _has_commit(repo, target):
        with_retries(
            f"{what}: git fetch {url}",
            repo.git.fetch,
            "--tags",
            "origin",
            "+refs/heads/*:refs/remotes/origin/*",
        )
        if repo.git.rev_parse("--is-shallow-repository") == "true":
            with_retries(
                f"{what}: git fetch --unshallow {url}", repo.git.fetch, "--unshallow", "origin"
            )
    if not _has_commit(repo, target):
        raise InstallError(f"{what}: commit {target} ({ref}) is not in {url}")


def _submodules(repo: git.Repo, what: str) -> None:
    if Path(repo.working_tree_dir or "", ".gitmodules").exists():
        with_retries(
            f"{what}: git submodule update",
            repo.git.submodule,
            "update",
            "--init",
            "--recursive",
            "--depth",
            "1",
        )
