"""Fixtures: a local git repository of the ComfyUI stand-in, and real nodes booted from it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import git
import pytest

from machine.demo import DEMO_AUTHOR, prepare_standin_repo
from tests.support import Node, short_tmpdir


@pytest.fixture(scope="session")
def standin_repo() -> Iterator[tuple[str, str]]:
    """file:// URL and commit of a git repository holding the stand-in (made once)."""
    root = short_tmpdir()
    yield prepare_standin_repo(root)
    shutil.rmtree(root, ignore_errors=True)


def standin_variant(root: Path, files: dict[str, str]) -> tuple[str, str]:
    """A stand-in repository with extra files (e.g. a custom node); URL and commit."""
    url, _ = prepare_standin_repo(root)
    repo_dir = root / "demo" / "comfyui-standin"
    for name, text in files.items():
        (repo_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / name).write_text(text)
    with git.Repo(repo_dir) as repo:
        repo.git.add("--all")
        repo.index.commit("variant", author=DEMO_AUTHOR, committer=DEMO_AUTHOR)
        return url, repo.head.commit.hexsha


@pytest.fixture
def make_node(standin_repo: tuple[str, str]) -> Iterator[Callable[..., Node]]:
    """Build nodes on free ports with their own workspace; every process is gone afterwards.

    ``files`` adds files to the stand-in's repository (a custom node, say)."""
    nodes: list[Node] = []

    def make(gpus: int = 2, files: dict[str, str] | None = None, **env: str) -> Node:
        root = short_tmpdir()
        url, commit = standin_variant(root, files) if files else standin_repo
        node = Node(root / "ws", {"COMFYUI_REPO": url, "COMFYUI_REF": commit, **env}, gpus)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill_everything()
        shutil.rmtree(node.workspace.parent, ignore_errors=True)


@pytest.fixture
def workspace() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
