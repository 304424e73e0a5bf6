"""The image installs comfy-machine from its wheel: what the code imports must come with the
wheel's declared dependencies, or the container's agent fails where the dev venv works."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata

from tests.ship.recipes import ROOT

# Programs run by ComfyUI's interpreter, not the agent's: the stand-in (its own requirements)
# and the GPU self-test (torch, which ComfyUI's environment has).
NOT_THE_AGENT = (
    ROOT / "machine" / "standin" / "comfyui",
    ROOT / "services" / "gpu" / "selftest_script.py",
)


# Imports that only a setting reaches, from the extra that provides them (MACHINE_EVENT_LOOP=uvloop
# asks for `pip install 'comfy-machine[uvloop]'` and says so when it is missing).
OPTIONAL = {ROOT / "machine" / "event_loop.py": "uvloop"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def dependency_closure(names: list[str]) -> set[str]:
    """The declared distributions and everything they require (extras left out)."""
    seen: set[str] = set()
    todo = [_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_the_agents_imports_come_with_the_wheels_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    installed = dependency_closure(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    providers = metadata.packages_distributions()
    missing = []
    for package in sorted(packages):
        for path in sorted((ROOT / package).rglob("*.py")):
            if any(path == p or p in path.parents for p in NOT_THE_AGENT):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in packages:
                        continue
                    dists = {_name(d) for d in providers.get(top, [])}
                    extra = OPTIONAL.get(path)
                    optional = dependency_closure(extras[extra]) if extra else set()
                    if not dists & (installed | optional):
                        where = path.relative_to(ROOT)
                        missing.append(f"{where} imports {top} ({', '.join(dists) or '?'})")
    assert not missing, "not in pyproject.toml's dependencies: " + "; ".join(missing)
