"""The head start's record and digest: what decides, before Settings, whether the last boot's
launch can start this one (services/supervisor/head_start.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from services.supervisor.head_start import (
    Record,
    guess_workspace,
    inputs_digest,
    read_record,
    record_path,
    write_record,
)

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


def a_record(workspace: Path) -> Record:
    return Record(
        digest="d" * 64, env_names=tuple(NAMES), files=(str(workspace),), workspace=str(workspace),
        conf_path=str(workspace / "run" / "supervisord.conf"), conf="[supervisord]\n",
        instances=("comfyui-gpu0",), output_path=str(workspace / "logs" / "supervisord.out"),
        events_socket=str(workspace / "run" / "events.sock"), ports=(("127.0.0.1", 8188),),
        withheld_env=("HF_TOKEN",), dirs=(str(workspace / "output"),),
        extra_model_paths=None, extra_model_paths_yaml="",
    )


def test_a_record_reads_back_as_written_and_only_whole(tmp_path: Path) -> None:
    record = a_record(tmp_path)
    write_record(record)
    path = record_path(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_record(path) == record
    text = path.read_text()
    # Half a file, another version's fields, garbage: no record (the boot starts as usual).
    for broken in (text[: len(text) // 2], json.dumps({**json.loads(text), "extra": 1}),
                   json.dumps({k: v for k, v in json.loads(text).items() if k != "conf"}),
                   json.dumps({**json.loads(text), "ports": [["127.0.0.1"]]}), "[]", "\0"):
        path.write_text(broken)
        assert read_record(path) is None, broken
    assert read_record(tmp_path / "missing.json") is None
    assert dataclasses.replace(record, conf="other") != record


def test_the_workspace_is_guessed_as_settings_would_name_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert guess_workspace({}) == Path("/workspace")
    assert guess_workspace({"machine_workspace": "ws"}) == tmp_path / "ws"
    config = tmp_path / "m.toml"
    config.write_text('MACHINE_WORKSPACE = "/srv/ws"\n')
    assert guess_workspace({"MACHINE_CONFIG": str(config)}) == Path("/srv/ws")
    # The environment wins over the file, as in Settings; an unreadable file is no guess.
    assert guess_workspace({"MACHINE_CONFIG": str(config), "MACHINE_WORKSPACE": "/a"}) == Path("/a")
    config.write_text("not toml [")
    assert guess_workspace({"MACHINE_CONFIG": str(config)}) == Path("/workspace")
    assert os.getcwd() == str(tmp_path)
