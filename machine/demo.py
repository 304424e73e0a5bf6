"""The demo node: the real boot on a machine without a GPU, with the ComfyUI stand-in installed
by the real install step from a local git repository made in the workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import git

from machine.standin import SOURCE_DIR

DEMO_AUTHOR = git.Actor("comfy-machine demo", "demo@comfy-machine.invalid")


def prepare_standin_repo(workspace: Path) -> tuple[str, str]:
    """Create or update ``<workspace>/demo/comfyui-standin`` (a git repo); its URL and commit."""
    repo_dir = workspace / "demo" / "comfyui-standin"
    repo_dir.mkdir(parents=True, exist_ok=True)
    repo = git.Repo(repo_dir) if (repo_dir / ".git").exists() else git.Repo.init(repo_dir)
    with repo:  # close gitpython's `git cat-file` helpers
        for existing in repo_dir.iterdir():
            if existing.name != ".git":
                shutil.rmtree(existing) if existing.is_dir() else existing.unlink()
        shutil.copytree(
            SOURCE_DIR,
            repo_dir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "output", "input", "models"),
        )
        repo.git.add("--all")
        if not repo.head.is_valid() or repo.is_dirty(index=True, working_tree=False):
            repo.index.commit(
                "ComfyUI stand-in for comfy-machine demo", author=DEMO_AUTHOR, committer=DEMO_AUTHOR
            )
        return repo_dir.resolve().as_uri(), repo.head.commit.hexsha
