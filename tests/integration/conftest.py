"""Fixtures: a local git repository of the ComfyUI stand-in, and real nodes booted from it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machine.demo import prepare_standin_repo
from tests.support import Node, short_tmpdir


@pytest.fixture(scope="session")
def standin_repo() -> Iterator[tuple[str, str]]:
    """file:// URL and commit of a git repository holding the stand-in (made once)."""
    root = short_tmpdir()
    yield prepare_standin_repo(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_node(standin_repo: tuple[str, str]) -> Iterator[Callable[..., Node]]:
    """Build nodes on free ports with their own workspace; every process is gone afterwards."""
    url, commit = standin_repo
    nodes: list[Node] = []

    def make(gpus: int = 2, **env: str) -> Node:
        node = Node(
            short_tmpdir() / "ws", {"COMFYUI_REPO": url, "COMFYUI_REF": commit, **env}, gpus
        )
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
