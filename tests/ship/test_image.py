"""The Dockerfile, read and linted (no container engine here to build it)."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

from tests.ship.recipes import (
    DOCKERFILE,
    HEALTH_PORT,
    PORT_START,
    ROOT,
    check_settings,
    dockerfile,
    dockerfile_env,
    exposed_ports,
    global_args,
    healthcheck_command,
    tool,
)


def test_hadolint_clean() -> None:
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The one rule silenced, with its reason beside it: apt versions follow the base image.
    ignored = set(re.findall(r"hadolint ignore=(\S+)", DOCKERFILE.read_text()))
    assert ignored <= {"DL3008"}, ignored


def test_multi_stage_on_a_cuda_runtime_base_with_the_wheel_built_apart() -> None:
    instructions = dockerfile()
    stages = [i.stage for i in instructions if i.keyword == "FROM"]
    assert stages == ["uv", "python", "build", "comfyui-env", "agent", "full"]
    base = global_args()["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.04", base), base
    froms = {i.stage: i.args for i in instructions if i.keyword == "FROM"}
    assert froms["agent"].startswith("${CUDA_IMAGE}") and froms["full"].startswith("agent")
    runs = {i.stage: i.args for i in instructions if i.keyword == "RUN" and "uv build" in i.args}
    assert list(runs) == ["build"] and "--wheel" in runs["build"]
    assert any(i.keyword == "RUN" and "uv python install 3.11" in i.args for i in instructions)
    # The runtime stages take the virtualenv made from the wheel, not the sources.
    copies = [i.args for i in instructions if i.stage == "agent" and i.keyword == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies


def test_every_package_of_the_wheel_is_copied_into_the_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copies = {i.args for i in dockerfile() if i.stage == "build" and i.keyword == "COPY"}
    for package in packages:
        assert f"{package} ./{package}" in copies, f"{package}/ is not copied into the build"
    assert "pyproject.toml README.md ./" in copies
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {*packages, "pyproject.toml", "README.md", "entrypoint.sh"}
    assert not needed & ignored, needed & ignored


def test_runtime_contract_pid1_ports_volume_health_user() -> None:
    instructions = dockerfile()
    final = [i for i in instructions if i.stage in ("agent", "full")]
    by_key = {i.keyword: i.args for i in final}
    assert json.loads(by_key["ENTRYPOINT"]) == ["tini", "--", "/usr/local/bin/entrypoint.sh"]
    assert json.loads(by_key["CMD"]) == ["up"]
    assert json.loads(by_key["VOLUME"]) == ["/workspace"]
    assert "COPY --chmod=0755 entrypoint.sh /usr/local/bin/entrypoint.sh" in {
        f"{i.keyword} {i.args}" for i in final
    }
    assert any("tini" in i.args.split() for i in final if i.keyword == "RUN")
    # Caddy, the authenticating proxy of COMFYUI_EXPOSE=proxy, from the Ubuntu archive.
    assert any("caddy" in i.args.split() for i in final if i.keyword == "RUN")
    env = dockerfile_env("agent")
    assert env["MACHINE_WORKSPACE"] == "/workspace"
    assert int(env["MACHINE_HEALTH_PORT"]) == HEALTH_PORT
    assert int(env["COMFYUI_PORT_START"]) == PORT_START
    assert exposed_ports() == {HEALTH_PORT, *range(PORT_START, PORT_START + 8)}
    # The agent and ComfyUI run as comfy (UID 1000); no USER line: the entrypoint drops to it.
    assert env["MACHINE_USER"] == "comfy"
    assert "useradd --uid 1000 --gid 1000" in " ".join(i.args for i in final)
    assert "USER" not in by_key
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/livez" in command[2]


def test_image_settings_are_valid() -> None:
    env = {**dockerfile_env("agent"), **dockerfile_env("full")}
    env["COMFYUI_REF"] = env["COMFYUI_REF"].replace("${COMFYUI_REF}", global_args()["COMFYUI_REF"])
    ours = {k: v for k, v in env.items() if k.startswith(("MACHINE_", "COMFYUI_"))}
    assert ours["COMFYUI_PYTHON"] == "/opt/comfyui-venv/bin/python"
    check_settings(ours, "Dockerfile")
