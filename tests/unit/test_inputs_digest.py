"""The digest of Settings' inputs, computed without Settings (config/inputs_digest.py): what
the head start and `plan`'s cache trust to say that Settings would come out the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.inputs_digest import inputs_digest

NAMES = ["COMFYUI_ARGS", "NUM_GPUS"]


def test_the_digest_follows_the_settings_inputs_and_nothing_else(tmp_path: Path) -> None:
    config = tmp_path / "machine.toml"
    config.write_text("num_gpus = 1\n")
    files = [str(config), str(tmp_path)]
    env = {"COMFYUI_ARGS": "--lowvram", "HOME": "/root"}
    digest = inputs_digest(env, NAMES, files)
    assert inputs_digest(dict(env), NAMES, files) == digest
    # Names are case-insensitive and empty is unset, as load_settings reads them.
    assert inputs_digest({"comfyui_args": "--lowvram"}, NAMES, files) == digest
    assert inputs_digest({**env, "NUM_GPUS": ""}, NAMES, files) == digest
    # Another variable than the settings' does not count.
    assert inputs_digest({**env, "HOME": "/home/x"}, NAMES, files) == digest
    assert inputs_digest({**env, "COMFYUI_ARGS": "--cpu"}, NAMES, files) != digest
    assert inputs_digest({**env, "NUM_GPUS": "2"}, NAMES, files) != digest
    # A named file that changes (here its size), or appears or goes, does.
    config.write_text("num_gpus = 2 \n")
    changed = inputs_digest(env, NAMES, files)
    assert changed != digest
    config.unlink()
    assert inputs_digest(env, NAMES, files) not in (digest, changed)
    # A named directory counts as which directory it is, not by what is added to it.
    config.write_text("num_gpus = 2 \n")
    again = inputs_digest(env, NAMES, files)
    (tmp_path / "agent.log").write_text("more")
    assert inputs_digest(env, NAMES, files) == again


def test_the_digest_follows_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = inputs_digest({}, NAMES, [])
    monkeypatch.chdir(tmp_path)
    assert inputs_digest({}, NAMES, []) != digest


def test_the_digest_follows_the_agents_own_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A changed agent may read the same inputs differently: any of its source files counts.
    import config.inputs_digest as module

    source = tmp_path / "services" / "install" / "lock.py"
    source.parent.mkdir(parents=True)
    source.write_text("A = 1\n")
    monkeypatch.setattr(module, "_CODE_ROOT", tmp_path)
    digest = inputs_digest({}, NAMES, [])
    (tmp_path / "services" / "__pycache__").mkdir()
    (tmp_path / "services" / "__pycache__" / "lock.cpython-311.pyc").write_bytes(b"x")
    assert inputs_digest({}, NAMES, []) == digest  # compiled files are not the code
    source.write_text("A = 22\n")
    assert inputs_digest({}, NAMES, []) != digest
