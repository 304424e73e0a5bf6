"""Git checkouts at a pinned commit: resolve, clone (shallow where the ref allows), update,
check what is on disk. Idempotent; a half-done clone is never taken as done.

Every git command that names a URL or a ref, or may touch the network, runs through
``run_git``: user input (URLs, refs, commits) only after ``--end-of-options``; the ``ext``
transport off and ``file`` allowed only for a repository the user named (never for its
submodules), through ``GIT_CONFIG_*`` so every git process below inherits it; credentials only
as an Authorization header for that URL in git's environment (never in argv, a URL or a file);
a stall timeout (``http.lowSpeedTime``) and an overall bound enforced by killing git's process
group; retries with backoff for transient failures. gitpython is used for local work only (init,
status, stash, reading commits)."""

from __future__ import annotations

import base64
import contextlib
import difflib
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from config.errors import InstallError
from config.git_input import GitAuth, redact_urls, ref_problem, split_userinfo, url_problem
from services.process_group import run_in_group

if TYPE_CHECKING:
    import git

log = logging.getLogger(__name__)

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# A transfer slower than this many bytes/s for GIT_TIMEOUT seconds is a stall.
LOW_SPEED_LIMIT = 1000
# The overall bound on one git command, as a multiple of GIT_TIMEOUT.
OVERALL_FACTOR = 10
ALL_BRANCHES = "+refs/heads/*:refs/remotes/origin/*"
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL for a git stopped at its bound
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# git's messages for failures that no retry mends (lower case).
PERMANENT = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "not found",
    "does not appear to be a git repository",
    "returned error: 401",
    "returned error: 403",
    "returned error: 404",
    "couldn't find remote ref",
    "not our ref",
    "unadvertised object",
    "not allowed",
    "not supported",
    "invalid",
    "would be overwritten",
)


class CheckoutAction(StrEnum):
    """What a checkout had to do."""

    SKIPPED = "skipped"  # already at the commit, clean
    CLONED = "cloned"
    UPDATED = "updated"


@dataclass(frozen=True)
class CheckoutResult:
    commit: str
    action: CheckoutAction
    stashed: bool = False  # local edits were saved with `git stash` before the checkout


@dataclass(frozen=True)
class GitOptions:
    """How git commands for one repository run: GIT_TIMEOUT, GIT_RETRIES, credentials."""

    timeout: float = 120.0  # seconds without progress (< LOW_SPEED_LIMIT bytes/s)
    retries: int = 2  # further attempts after a transient failure
    # The Authorization header value for the repository's URL; never shown.
    authorization: str | None = field(default=None, repr=False)

    @property
    def bound(self) -> float:
        """The most seconds one git command may take, progress or not."""
        return OVERALL_FACTOR * self.timeout


class GitFailure(Exception):
    """A git command failed (``transient``: a retry may do better) or ran past its bound."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


def authorization(auth: GitAuth | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Authorization header value for ``auth``: the token of its ``auth_env`` (Bearer, or
    Basic with the URL's user name when it has one), else the URL's ``user:password`` (Basic)."""
    if auth is None:
        return None
    environ = os.environ if environ is None else environ
    user, _, password = (auth.userinfo or "").partition(":")
    token = environ.get(auth.token_env, "") if auth.token_env else ""
    if token:
        return _basic(unquote(user), token) if user else f"Bearer {token}"
    if auth.token_env:
        log.warning(
            "auth_env variable is not set; trying without credentials",
            extra={"fields": {"auth_env": auth.token_env}},
        )
    if auth.userinfo:
        return _basic(unquote(user), unquote(password))
    return None


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _allows_file(url: str) -> bool:
    """``url`` is a local repository (file:// or an absolute path) the user named."""
    return url.startswith("/") or urlsplit(url).scheme == "file"


def git_env(
    url: str | None,
    options: GitOptions,
    allow_file: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a git process: ours plus the safety and timeout configuration (as
    GIT_CONFIG_* so every git it starts, submodules included, has it) and the credentials."""
    env = dict(os.environ if environ is None else environ)
    config = [
        ("protocol.ext.allow", "never"),
        ("http.lowSpeedLimit", str(LOW_SPEED_LIMIT)),
        ("http.lowSpeedTime", str(max(1, math.ceil(options.timeout)))),
    ]
    if allow_file:
        config.append(("protocol.file.allow", "always"))
    if options.authorization and url and urlsplit(url).scheme in ("http", "https"):
        # Scoped to this repository's URL: no other host or repository (a submodule) gets it.
        config.append((f"http.{url}.extraHeader", f"Authorization: {options.authorization}"))
    given = env.get("GIT_CONFIG_COUNT", "0")
    start = int(given) if given.isdigit() else 0  # keep the user's own, add ours after them
    for index, (key, value) in enumerate(config, start=start):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    env["GIT_CONFIG_COUNT"] = str(start + len(config))
    env.update(
        # Protocols whose policy is "user" (file, unknown ones) only where allowed above.
        GIT_PROTOCOL_FROM_USER="0",
        # Never wait for a password on a terminal: fail and say so.
        GIT_TERMINAL_PROMPT="0",
        GCM_INTERACTIVE="never",
        LC_ALL="C",
    )
    return env


def run_git(
    args: list[str],
    options: GitOptions,
    cwd: Path | None = None,
    url: str | None = None,
    allow_file: bool = False,
) -> str:
    """Run ``git args`` and return its stdout; GitFailure when it fails or runs past
    ``options.bound``. Under the group launcher: git and whatever it starts (git-remote-https,
    ssh) run in their own process group, ended whole when git is stopped or the agent dies."""
    try:
        proc = run_in_group(
            ["git", *args],
            timeout=options.bound,
            grace=KILL_GRACE_S,
            cwd=cwd,
            env=git_env(url, options, allow_file),
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        raise GitFailure(
            f"no result within {options.bound:.0f}s (10 x GIT_TIMEOUT), stopped", transient=True
        ) from None
    if proc.returncode != 0:
        text = proc.stderr.decode(errors="replace")
        message = _message(text) or f"git {args[0]} exited {proc.returncode}"
        lowered = text.lower()
        raise GitFailure(message, transient=not any(p in lowered for p in PERMANENT))
    out: bytes = proc.stdout
    return out.decode(errors="replace")


def _message(stderr: str) -> str:
    """The line of git's stderr that says what failed, without credentials, bounded."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = next(
        (line for line in lines if line.startswith("fatal:")),
        next(
            (line for line in reversed(lines) if line.startswith("error:")),
            lines[-1] if lines else "",
        ),
    )
    return redact_urls(chosen)[:500]


def _network(
    what: str,
    args: list[str],
    options: GitOptions,
    url: str,
    cwd: Path | None = None,
    allow_file: bool = False,
) -> str:
    """``run_git`` retried with backoff (GIT_RETRIES) while failures are transient; then an
    InstallError naming ``what`` (which names the URL) and what to do."""
    attempts = options.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return run_git(args, options, cwd=cwd, url=url, allow_file=allow_file)
        except GitFailure as exc:
            if not exc.transient:
                asks = "could not read username" in exc.message.lower()
                cause = "the server wants credentials it was not given or refused (HTTP 401)"
                raise InstallError(
                    f"{what} failed: {cause if asks else exc.message}; check the URL, the ref "
                    "and the credentials (user:token in the URL, or auth_env)"
                ) from None
            if attempt == attempts:
                raise InstallError(
                    f"{what} failed after {attempts} attempt(s): {exc.message}; check that the "
                    f"host is reachable from this machine (GIT_TIMEOUT={options.timeout:g}s "
                    f"without progress, GIT_RETRIES={options.retries})",
                    transient=True,
                ) from None
            log.warning(
                "git retry",
                extra={"fields": {"what": what, "attempt": attempt, "error": exc.message}},
            )
            time.sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


def _remote(url: str, ref: str | None, what: str, options: GitOptions) -> tuple[str, GitOptions]:
    """Check ``url`` and ``ref`` again where they reach git (whoever called), and move a URL's
    credentials into the options: git sees the URL without them."""
    public, userinfo = split_userinfo(url)
    problem = url_problem(public)
    if problem:
        raise InstallError(f"{what}: git URL {redact_urls(url)!r} refused: {problem}")
    if ref is not None and (problem := ref_problem(ref)):
        raise InstallError(f"{what}: ref {ref!r} refused: it {problem}")
    if userinfo and options.authorization is None:
        options = replace(options, authorization=authorization(GitAuth(userinfo=userinfo)))
    return public, options


def resolve_ref(url: str, ref: str, what: str, options: GitOptions | None = None) -> str:
    """The commit ``ref`` (commit, tag, branch or HEAD) names in ``url``; errors list close refs."""
    url, options = _remote(url, ref, what, options or GitOptions())
    if FULL_SHA.match(ref):
        return ref
    out = _network(
        f"{what}: git ls-remote {url}",
        ["ls-remote", "--end-of-options", url],
        options,
        url,
        allow_file=_allows_file(url),
    )
    refs: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        refs[name] = sha
    for candidate in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if candidate in refs and FULL_SHA.match(refs[candidate]):
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
    import git  # gitpython, for the install path alone: a warm boot never loads it

    try:
        with git.Repo(dest) as repo:
            return repo.head.commit.hexsha if repo.head.is_valid() else None
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return None


# A warm boot's check of one checkout: local, read-only, bounded.
INTACT_TIMEOUT_S = 120.0


def checkout_intact(dest: Path, commit: str) -> bool:
    """``dest`` has ``commit`` checked out and no modified tracked file (the warm-boot check).

    One ``git status`` run directly: it only reads (no optional locks, no fsmonitor hook), ends
    in milliseconds, and a warm boot must not pay gitpython's several commands, each under the
    group launcher, per checkout."""
    if not (dest / ".git").exists():  # its own repository, never a parent directory's
        return False
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-c", "core.fsmonitor=false", "status",
             "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=dest, env=git_env(None, GitOptions()), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=INTACT_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    lines = proc.stdout.decode(errors="replace").splitlines()
    # "# branch.oid <sha>" first; any line not starting with "#" is a changed tracked file.
    return (
        proc.returncode == 0
        and f"# branch.oid {commit}" in lines
        and all(line.startswith("#") for line in lines)
    )


def ensure_checkout(
    url: str,
    ref: str,
    dest: Path,
    what: str,
    target: str | None = None,
    options: GitOptions | None = None,
) -> CheckoutResult:
    """Make ``dest`` a clean checkout of ``ref`` (or of ``target``, already resolved)."""
    url, options = _remote(url, ref, what, options or GitOptions())
    target = target or resolve_ref(url, ref, what, options)
    if not FULL_SHA.match(target):
        raise InstallError(f"{what}: {target!r} is not a full commit id")
    if dest.exists():
        action, stashed = _update(url, ref, target, dest, what, options)
    else:
        action, stashed = _clone(url, ref, target, dest, what, options), False
    # Check what is on disk, not what the commands claimed.
    head = head_commit(dest)
    if head != target:
        raise InstallError(f"{what}: after checkout HEAD is {head}, expected {target}")
    return CheckoutResult(target, action, stashed)


def _update(
    url: str, ref: str, target: str, dest: Path, what: str, options: GitOptions
) -> tuple[CheckoutAction, bool]:
    import git

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
        origin = next((r for r in repo.remotes if r.name == "origin"), None)
        if origin is None:
            _local(what, ["remote", "add", "--end-of-options", "origin", url], dest, options)
        elif origin.url != url:
            # Also drops credentials an older version stored in the URL.
            _local(what, ["remote", "set-url", "--end-of-options", "origin", url], dest, options)
        if repo.head.is_valid() and repo.head.commit.hexsha == target:
            return (CheckoutAction.UPDATED if stashed else CheckoutAction.SKIPPED), stashed
        _fetch(repo, url, ref, target, what, options)
        _switch(dest, target, what, options)
        _submodules(dest, url, what, options)
    return CheckoutAction.UPDATED, stashed


def _clone(
    url: str, ref: str, target: str, dest: Path, what: str, options: GitOptions
) -> CheckoutAction:
    # Clone beside the destination and rename: a killed clone never looks like a checkout.
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    import git

    repo = git.Repo.init(partial)
    with repo:
        _local(what, ["remote", "add", "--end-of-options", "origin", url], partial, options)
        _fetch(repo, url, ref, target, what, options)
        _switch(partial, target, what, options)
        _submodules(partial, url, what, options)
    partial.rename(dest)
    return CheckoutAction.CLONED


def _local(what: str, args: list[str], cwd: Path, options: GitOptions) -> None:
    try:
        run_git(args, options, cwd=cwd)
    except GitFailure as exc:
        raise InstallError(f"{what}: git {args[0]} {args[1]} failed: {exc.message}") from None


def _switch(cwd: Path, target: str, what: str, options: GitOptions) -> None:
    # `git checkout` takes no --end-of-options (git 2.39); `git switch` does. A filter such
    # as git-lfs may download here: same timeouts.
    try:
        run_git(["switch", "--detach", "--end-of-options", target], options, cwd=cwd)
    except GitFailure as exc:
        raise InstallError(f"{what}: git switch --detach {target} failed: {exc.message}") from None


def _has_commit(repo: git.Repo, sha: str) -> bool:
    import git

    try:
        repo.commit(sha)
    except (ValueError, git.BadName):
        return False
    return True


def _fetch(repo: git.Repo, url: str, ref: str, target: str, what: str, options: GitOptions) -> None:
    """Fetch ``target`` as shallowly as the server allows, falling back to a full fetch."""
    if _has_commit(repo, target):
        return
    cwd = Path(repo.git_dir).parent
    allow_file = _allows_file(url)
    # Most hosts serve a commit by id at depth 1; tags and branches always can be.
    wanted = target if FULL_SHA.match(ref) or ref == "HEAD" else ref
    with contextlib.suppress(GitFailure):
        run_git(
            ["fetch", "--depth", "1", "--end-of-options", "origin", wanted],
            options,
            cwd=cwd,
            url=url,
            allow_file=allow_file,
        )
    if not _has_commit(repo, target):
        _network(
            f"{what}: git fetch {url}",
            ["fetch", "--tags", "--end-of-options", "origin", ALL_BRANCHES],
            options,
            url,
            cwd=cwd,
            allow_file=allow_file,
        )
        if repo.git.rev_parse("--is-shallow-repository") == "true":
            _network(
                f"{what}: git fetch --unshallow {url}",
                ["fetch", "--unshallow", "--end-of-options", "origin"],
                options,
                url,
                cwd=cwd,
                allow_file=allow_file,
            )
    if not _has_commit(repo, target):
        raise InstallError(f"{what}: commit {target} ({ref}) is not in {url}")


def _submodules(cwd: Path, url: str, what: str, options: GitOptions) -> None:
    # Submodule URLs come from the repository, not the user: no file transport for them
    # (git's own default), and the credentials stay scoped to ``url``.
    if (cwd / ".gitmodules").exists():
        _network(
            f"{what}: git submodule update",
            ["submodule", "update", "--init", "--recursive", "--depth", "1"],
            options,
            url,
            cwd=cwd,
        )
