"""deploy/vast and deploy/runpod: the templates agree with the image and with their READMEs."""

from __future__ import annotations

import json
import re
import shlex

from tests.ship.recipes import (
    DEPLOY,
    HEALTH_PORT,
    IMAGE,
    PORT_START,
    check_settings,
    exposed_ports,
)

INSTANCE_PORTS = set(range(PORT_START, PORT_START + 8))


def test_vast_template_runs_the_images_entrypoint_with_its_ports() -> None:
    template = json.loads((DEPLOY / "vast" / "template.json").read_text())
    assert f"{template['image']}:{template['tag']}" == IMAGE
    assert template["runtype"] == "args"  # the image's ENTRYPOINT (tini), not Vast's
    assert template["args_str"] == "up"
    options = shlex.split(template["env"])
    flags = list(zip(options[::2], options[1::2], strict=True))
    ports = {value for flag, value in flags if flag == "-p"}
    assert ports == {f"{p}:{p}" for p in exposed_ports()}
    assert exposed_ports() == {HEALTH_PORT, *INSTANCE_PORTS}
    env = dict(value.split("=", 1) for flag, value in flags if flag == "-e")
    # ComfyUI behind the authenticating proxy; the token is an account variable of Vast's,
    # never in the template.
    assert env["COMFYUI_EXPOSE"] == "proxy" and "COMFYUI_ACCESS_TOKEN" not in env
    assert "COMFYUI_LISTEN" not in env
    check_settings({**env, "COMFYUI_ACCESS_TOKEN": None}, "vast/template.json")
    assert template["recommended_disk_space"] >= 50
    readme = (DEPLOY / "vast" / "README.md").read_text()
    assert f"`{template['env']}`" in readme
    assert f"`{template['image']}` : `{template['tag']}`" in readme


def test_runpod_template_mounts_the_workspace_and_exposes_the_ports() -> None:
    template = json.loads((DEPLOY / "runpod" / "template.json").read_text())
    assert template["imageName"] == IMAGE
    assert template["volumeMountPath"] == "/workspace"
    assert template["dockerStartCmd"] == []  # the image's CMD: up
    assert {p.removesuffix("/http") for p in template["ports"]} == {str(p) for p in exposed_ports()}
    assert all(p.endswith("/http") for p in template["ports"])
    env = dict(template["env"])
    # ComfyUI behind the authenticating proxy, its token from RunPod's secrets, never inline.
    assert env["COMFYUI_EXPOSE"] == "proxy" and "COMFYUI_LISTEN" not in env
    assert re.fullmatch(r"\{\{ RUNPOD_SECRET_\w+ \}\}", env["COMFYUI_ACCESS_TOKEN"])
    env["COMFYUI_ACCESS_TOKEN"] = None
    check_settings(env, "runpod/template.json")
    assert template["containerDiskInGb"] >= 20 and template["volumeInGb"] >= 50
    readme = (DEPLOY / "runpod" / "README.md").read_text()
    listed = ",".join(p.removesuffix("/http") for p in template["ports"])
    assert f"`{listed}`" in readme
    assert f"`{IMAGE}`" in readme
    assert f"**{template['containerDiskInGb']} GB**" in readme
