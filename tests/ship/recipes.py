"""The shipping files as data: the Dockerfile's instructions, the deploy/ recipes, and the
environment names comfy-machine understands."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from config.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = ROOT / "entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "ghcr.io/comfy-machine/comfy-machine:0.1.0"
HEALTH_PORT = 9188
PORT_START = 8188

#: Read by entrypoint.sh (MACHINE_USER) and by the metrics (NODE_NAME, the Hostname label).
EXTRA_ENV = {"MACHINE_USER", "NODE_NAME"}
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}


def tool(name: str) -> str:
    """A command-line tool from this environment's bin/ (pip-installed), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: it comes with the test dependencies"
    return found


def path_with_venv() -> str:
    """PATH with this interpreter's bin/ first, so that `comfy-machine` is this checkout's."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass(frozen=True)
class Instruction:
    stage: str | None
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions (continuations joined, comments dropped), with their stage."""
    text = re.sub(r"\\\n(?:[ \t]*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    out: list[Instruction] = []
    stage: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = match.group(1) if match else None
        out.append(Instruction(stage, keyword, " ".join(args.split())))
    return out


def dockerfile_env(stage: str) -> dict[str, str]:
    """ENV of one stage (simple KEY=value pairs)."""
    env: dict[str, str] = {}
    for ins in dockerfile():
        if ins.stage == stage and ins.keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in ins.args.split()))
    return env


def global_args() -> dict[str, str]:
    """The Dockerfile's ARGs before the first FROM, with their defaults."""
    return dict(i.args.split("=", 1) for i in dockerfile() if i.keyword == "ARG" and not i.stage)


def exposed_ports() -> set[int]:
    ports: set[int] = set()
    for ins in dockerfile():
        if ins.keyword == "EXPOSE":
            for item in ins.args.split():
                low, _, high = item.partition("-")
                ports.update(range(int(low), int(high or low) + 1))
    return ports


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK CMD (exec form)."""
    (check,) = [i for i in dockerfile() if i.keyword == "HEALTHCHECK"]
    return json.loads(check.args.split(" CMD ", 1)[1])


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_manifests() -> dict[str, list[dict[str, Any]]]:
    """deploy/k8s/*.yaml but the kustomization: file name -> its resources."""
    return {
        path.name: load_yaml_docs(path)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for docs in k8s_manifests().values()
        for doc in docs
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def worker_script(container: dict[str, Any]) -> str:
    """The shell script an example worker container runs (`tini -- bash -c SCRIPT`)."""
    assert container["command"] == ["tini", "--", "bash", "-c"], container["command"]
    (script,) = container["args"]
    return script


# What a secret store (a Kubernetes Secret, RunPod's secrets, Vast's account variables) gives
# COMFYUI_ACCESS_TOKEN at run time, where a recipe names it without a value.
RUNTIME_ACCESS_TOKEN = "set-at-run-time-0123456789abcdef"


def check_settings(env: dict[str, str | None], where: str) -> None:
    """Every name is one comfy-machine reads, and the values (None: set at run time) make
    valid settings."""
    unknown = sorted(set(env) - SETTINGS_ENV - EXTRA_ENV)
    assert not unknown, f"{where}: not comfy-machine settings: {unknown}"
    values = {k: v for k, v in env.items() if k in SETTINGS_ENV and v is not None}
    if "COMFYUI_ACCESS_TOKEN" in env and env["COMFYUI_ACCESS_TOKEN"] is None:
        values["COMFYUI_ACCESS_TOKEN"] = RUNTIME_ACCESS_TOKEN
    load_settings(environ=values)
