"""Each bad input that once crashed or misled `comfy-machine up`, run as a user would: exit 2 at
once, a message naming the field, the value and the fix, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _up(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"COMFYUI_CPU_ONLY": "1", "NUM_GPUS": "1"}
    return subprocess.run([sys.executable, "-m", "machine", "up"], cwd=cwd, text=True,
                          env={**os.environ, **base, **env}, capture_output=True, timeout=60)


def test_workspace_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "ws"
    target.write_text("not a directory")
    out = _up({"MACHINE_WORKSPACE": str(target)}, tmp_path)
    assert out.returncode == 2, out.stderr
    assert "MACHINE_WORKSPACE" in out.stderr and str(target) in out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr
    assert target.read_text() == "not a directory"


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "machine.toml"
    config.write_bytes(b'num_gpus = 1\ncomfyui_args = "caf\xe9"\n')
    out = _up({"MACHINE_CONFIG": str(config), "MACHINE_WORKSPACE": str(tmp_path / "ws")},
              tmp_path)
    assert out.returncode == 2, out.stderr
    assert "UTF-8" in out.stderr and str(config) in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "ws").exists()


def test_keys_that_differ_only_by_case(tmp_path: Path) -> None:
    config = tmp_path / "machine.toml"
    config.write_text("Num_Gpus = 3\nnum_gpus = 2\n")
    out = _up({"MACHINE_CONFIG": str(config), "MACHINE_WORKSPACE": str(tmp_path / "ws")},
              tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Num_Gpus" in out.stderr and "num_gpus" in out.stderr
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("value", ["100000000000000000000", "65"])
def test_absurd_gpu_count_names_num_gpus(tmp_path: Path, value: str) -> None:
    out = _up({"NUM_GPUS": value, "MACHINE_WORKSPACE": str(tmp_path / "ws")}, tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"NUM_GPUS='{value}'" in out.stderr and "64" in out.stderr
    assert "COMFYUI_PORT_START" not in out.stderr and not (tmp_path / "ws").exists()
