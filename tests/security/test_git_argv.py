"""Git never reads a ref or URL as an option, and dangerous transports stay off, at the git
calls themselves (not only where settings enter): a repository can have a branch named like
an option, and a submodule URL is whatever the repository says."""

from __future__ import annotations

import os
import time
from pathlib import Path

import git
import psutil
import pytest

from config.errors import InstallError
from services.install import git as gitops
from services.install.git import GitOptions, ensure_checkout, git_env, resolve_ref, run_git

PAYLOAD = "--upload-pack=touch${IFS}pwned;true"
AUTHOR = git.Actor("test", "test@example.invalid")


def _commit(path: Path, files: dict[str, str]) -> git.Repo:
    repo = git.Repo.init(path, initial_branch="main")
    for name, text in files.items():
        (path / name).write_text(text)
    repo.git.add("--all")
    repo.index.commit("init", author=AUTHOR, committer=AUTHOR)
    return repo


@pytest.fixture
def payload_repo(tmp_path: Path) -> tuple[str, str]:
    """A bare repository (file:// URL) with a branch literally named like a git option; the
    URL and the commit the branch names."""
    with _commit(tmp_path / "src", {"a.txt": "a\n"}) as repo:
        commit = repo.head.commit.hexsha
        repo.git.update_ref(f"refs/heads/{PAYLOAD}", commit)
    bare = tmp_path / "bare.git"
    git.Repo.clone_from(str(tmp_path / "src"), str(bare), bare=True, mirror=True).close()
    return bare.as_uri(), commit


def _pwned(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("pwned")]


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory for the test: where `touch pwned` would land."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_option_named_branch_is_a_clean_install_error(
    payload_repo: tuple[str, str], tmp_path: Path, elsewhere: Path
) -> None:
    """The service-level checkout, called directly with the branch name as its ref (no config
    validation in between): refused with an InstallError, nothing runs."""
    url, _ = payload_repo
    with pytest.raises(InstallError, match="starts with '-'") as info:
        ensure_checkout(url, PAYLOAD, tmp_path / "dest", "custom node evil")
    assert str(info.value).startswith("custom node evil:")
    with pytest.raises(InstallError):
        resolve_ref(url, PAYLOAD, "custom node evil")
    assert not _pwned(tmp_path, elsewhere)


def test_option_named_ref_reaches_git_only_as_a_ref(
    payload_repo: tuple[str, str], tmp_path: Path, elsewhere: Path
) -> None:
    """Below the ref check: the fetch puts the ref after --end-of-options, so git fetches the
    branch of that name instead of running an upload-pack of the attacker's choosing."""
    url, commit = payload_repo
    dest = tmp_path / "dest"
    with git.Repo.init(dest) as repo:
        run_git(["remote", "add", "--end-of-options", "origin", url], GitOptions(), cwd=dest)
        gitops._fetch(repo, url, PAYLOAD, commit, "test", GitOptions())
        assert repo.commit(commit).hexsha == commit
    assert not _pwned(tmp_path, elsewhere)


def test_option_like_urls_are_refused_where_git_is_called(tmp_path: Path, elsewhere: Path) -> None:
    for url in ("--upload-pack=touch pwned", "ext::sh -c touch% pwned", "-oProxyCommand=x"):
        with pytest.raises(InstallError, match="refused"):
            ensure_checkout(url, "main", tmp_path / "dest", "custom node evil")
    assert not _pwned(tmp_path, elsewhere)


def test_a_commit_that_is_not_a_commit_id_is_refused(
    payload_repo: tuple[str, str], tmp_path: Path
) -> None:
    url, _ = payload_repo
    with pytest.raises(InstallError, match="not a full commit id"):
        ensure_checkout(url, "main", tmp_path / "dest", "test", target=PAYLOAD)


def test_ext_submodule_is_refused_even_if_the_user_config_allows_it(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol policy travels in GIT_CONFIG_* to every git process, submodules included,
    and wins over a permissive global git config."""
    permissive = tmp_path / "gitconfig"
    permissive.write_text('[protocol]\n\tallow = always\n[protocol "ext"]\n\tallow = always\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(permissive))
    src = tmp_path / "node"
    marker = tmp_path / "pwned"
    with _commit(src, {"a.txt": "a\n"}) as repo:
        sub = repo.head.commit.hexsha
        (src / ".gitmodules").write_text(
            f'[submodule "sub"]\n\tpath = sub\n\turl = "ext::sh -c touch% {marker}"\n'
        )
        repo.git.update_index("--add", "--cacheinfo", f"160000,{sub},sub")
        repo.git.add(".gitmodules")
        repo.index.commit("submodule", author=AUTHOR, committer=AUTHOR)
        head = repo.head.commit.hexsha
    with pytest.raises(InstallError, match="submodule"):
        ensure_checkout(src.as_uri(), head, tmp_path / "dest", "custom node sub")
    assert not marker.exists() and not _pwned(tmp_path, elsewhere)


def test_every_git_process_gets_the_safety_config() -> None:
    env = git_env("https://host/o/r.git", GitOptions(timeout=7, authorization="Bearer t"))
    config = {
        env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"]
        for i in range(int(env["GIT_CONFIG_COUNT"]))
    }
    assert config["protocol.ext.allow"] == "never"
    assert "protocol.file.allow" not in config  # only for a repository the user named
    assert config["http.lowSpeedLimit"] == "1000" and config["http.lowSpeedTime"] == "7"
    assert config["http.https://host/o/r.git.extraHeader"] == "Authorization: Bearer t"
    assert env["GIT_PROTOCOL_FROM_USER"] == "0" and env["GIT_TERMINAL_PROMPT"] == "0"
    # A user's own GIT_CONFIG_* entries are kept; ours come after them.
    kept = git_env(None, GitOptions(), environ={
        "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.name", "GIT_CONFIG_VALUE_0": "x"})
    assert kept["GIT_CONFIG_KEY_0"] == "user.name" and kept["GIT_CONFIG_KEY_1"] == (
        "protocol.ext.allow")


def test_a_git_command_past_its_bound_is_killed_with_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport the stall timeout does not cover (ssh here, faked by a command that
    hangs): the overall bound (10 x GIT_TIMEOUT) stops git and everything it started."""
    marker = f"300.{os.getpid()}"  # a sleep of its own, to look for afterwards
    monkeypatch.setenv("GIT_SSH_COMMAND", f"sleep {marker} #")
    started = time.monotonic()
    with pytest.raises(InstallError, match="no result within 3s") as info:
        resolve_ref("ssh://git@127.0.0.1/o/r.git", "main", "custom node slow",
                    GitOptions(timeout=0.3, retries=0))
    assert time.monotonic() - started < 15
    assert "ssh://git@127.0.0.1/o/r.git" in str(info.value)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())
    ]
    assert not left, left

