"""ComfyUI's checkout from real local git repositories (file:// URLs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from config.errors import InstallError
from services.install.git import ensure_checkout

AUTHOR = git.Actor("test", "test@example.invalid")


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[str, git.Repo]]:
    repo = git.Repo.init(tmp_path / "upstream", initial_branch="master")
    (tmp_path / "upstream" / "main.py").write_text("print('v1')\n")
    repo.index.add(["main.py"])
    repo.index.commit("v1", author=AUTHOR, committer=AUTHOR)
    repo.create_tag("v1.0.0", message="release")  # annotated: resolves through ^{}
    (tmp_path / "upstream" / "main.py").write_text("print('v2')\n")
    repo.index.add(["main.py"])
    repo.index.commit("v2", author=AUTHOR, committer=AUTHOR)
    with repo:  # close gitpython's `git cat-file` helpers
        yield (tmp_path / "upstream").as_uri(), repo


def test_tag_branch_and_commit_resolve_and_warm_run_skips(
    upstream: tuple[str, git.Repo], tmp_path: Path
) -> None:
    url, repo = upstream
    dest = tmp_path / "ComfyUI"
    tagged = repo.tags["v1.0.0"].commit.hexsha
    first = ensure_checkout(url, "v1.0.0", dest, "ComfyUI")
    assert (first.action, first.commit) == ("cloned", tagged)
    assert (dest / "main.py").read_text() == "print('v1')\n"
    assert ensure_checkout(url, "v1.0.0", dest, "ComfyUI").action == "skipped"
    moved = ensure_checkout(url, "master", dest, "ComfyUI")
    assert (moved.action, moved.commit) == ("updated", repo.head.commit.hexsha)
    back = ensure_checkout(url, tagged, dest, "ComfyUI")
    assert back.action == "updated" and (dest / "main.py").read_text() == "print('v1')\n"


def test_missing_ref_names_the_nearest(upstream: tuple[str, git.Repo], tmp_path: Path) -> None:
    url, _ = upstream
    with pytest.raises(InstallError) as info:
        ensure_checkout(url, "v1.0.1", tmp_path / "ComfyUI", "ComfyUI")
    message = str(info.value)
    assert "ref 'v1.0.1' not found" in message and "v1.0.0" in message
    assert not (tmp_path / "ComfyUI").exists()


def test_missing_repo_fails_at_once_naming_it(tmp_path: Path) -> None:
    """Not a transient failure: no retries (those are for the network, tests/faults)."""
    url = (tmp_path / "nope").as_uri()
    with pytest.raises(InstallError) as info:
        ensure_checkout(url, "master", tmp_path / "ComfyUI", "ComfyUI")
    message = str(info.value)
    assert message.startswith(f"ComfyUI: git ls-remote {url} failed: ")
    assert "does not appear to be a git repository" in message


def test_local_edits_are_stashed_not_lost(upstream: tuple[str, git.Repo], tmp_path: Path) -> None:
    url, _repo = upstream
    dest = tmp_path / "ComfyUI"
    ensure_checkout(url, "v1.0.0", dest, "ComfyUI")
    (dest / "main.py").write_text("print('local fix')\n")
    result = ensure_checkout(url, "master", dest, "ComfyUI")
    assert result.stashed and result.action == "updated"
    assert (dest / "main.py").read_text() == "print('v2')\n"
    with git.Repo(dest) as checkout:
        assert "local fix" in checkout.git.stash("show", "-p")


def test_half_done_clone_is_not_taken_as_a_checkout(
    upstream: tuple[str, git.Repo], tmp_path: Path
) -> None:
    url, _ = upstream
    partial = tmp_path / ".ComfyUI.partial"  # what a clone killed half-way leaves
    partial.mkdir()
    (partial / "junk").write_text("x")
    result = ensure_checkout(url, "v1.0.0", tmp_path / "ComfyUI", "ComfyUI")
    assert result.action == "cloned" and not partial.exists()


def test_existing_non_git_directory_is_an_error(
    upstream: tuple[str, git.Repo], tmp_path: Path
) -> None:
    url, _ = upstream
    (tmp_path / "ComfyUI").mkdir()
    with pytest.raises(InstallError, match="not a git checkout"):
        ensure_checkout(url, "v1.0.0", tmp_path / "ComfyUI", "ComfyUI")
