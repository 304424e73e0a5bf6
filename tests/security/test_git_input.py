"""Git never reads user input as an option: refs and URLs are refused where they enter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.git_input import ref_problem, url_problem

# A branch of this name can exist upstream; `git fetch origin <ref>` once ran it as an option.
PAYLOAD = "--upload-pack=touch${IFS}pwned;true"


@pytest.mark.parametrize("ref", ["v0.3.64", "main", "feature/x-1", "a" * 40, "HEAD", "1e2543e"])
def test_ordinary_refs_pass(ref: str) -> None:
    assert ref_problem(ref) is None


@pytest.mark.parametrize(("ref", "rule"), [
    (PAYLOAD, "starts with '-'"),
    ("-x", "starts with '-'"),
    ("a..b", "no '..'"),
    ("a b", "no spaces"),
    ("x@{1}", "'@{'"),
    ("/main", "'/'"),
    ("main.lock", ".lock"),
    (".hidden", "starting with '.'"),
    ("a:b", "no spaces"),
])
def test_bad_refs_name_the_rule(ref: str, rule: str) -> None:
    problem = ref_problem(ref)
    assert problem is not None and rule in problem


@pytest.mark.parametrize("url", [
    "https://github.com/o/r.git", "http://host/o/r", "ssh://git@host/o/r", "git@host:o/r.git",
    "file:///srv/r", "/srv/r",
])
def test_git_urls_pass(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize("url", [
    "--upload-pack=x", "ext::sh -c touch% /tmp/pwned", "ssh://-oProxyCommand=x/o/r",
    "git@-oProxyCommand=x:o/r", "relative/path", "git://host/o/r", "file://relative",
    "https://host/o/r x",
])
def test_dangerous_or_unknown_urls_refused(url: str) -> None:
    assert url_problem(url) is not None


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "machine", *args], cwd=cwd, text=True,
                          env={**os.environ, **env}, capture_output=True, timeout=60)


@pytest.mark.parametrize("entry_point", ["env list", "toml", "snapshot", "COMFYUI_REF"])
@pytest.mark.parametrize("command", ["up", "install"])
def test_injected_ref_exits_2_and_runs_nothing(tmp_path: Path, entry_point: str,
                                               command: str) -> None:
    env = {"COMFYUI_CPU_ONLY": "1", "NUM_GPUS": "1", "MACHINE_WORKSPACE": str(tmp_path / "ws")}
    node = "https://github.com/o/tool"
    if entry_point == "env list":
        env["COMFYUI_CUSTOM_NODES"] = f"{node}@{PAYLOAD}"
    elif entry_point == "COMFYUI_REF":
        env["COMFYUI_REF"] = PAYLOAD
    else:
        config = tmp_path / "machine.toml"
        if entry_point == "toml":
            config.write_text(f'[[custom_nodes]]\nurl = "{node}"\nref = "{PAYLOAD}"\n')
        else:
            snapshot = tmp_path / "snapshot.json"
            snapshot.write_text(json.dumps({"comfyui": PAYLOAD, "git_custom_nodes": {
                node: {"hash": PAYLOAD, "disabled": False}}}))
            config.write_text(f'custom_nodes_snapshot = "{snapshot}"\n')
        env["MACHINE_CONFIG"] = str(config)
    out = _run([command], env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert PAYLOAD in out.stderr and "starts with '-'" in out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "ws").exists()
