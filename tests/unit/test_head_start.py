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
    read_record,
    record_path,
    write_record,
)

NAMES = ("COMFYUI_ARGS", "NUM_GPUS")


def a_record(workspace: Path) -> Record:
    return Record(
        digest="d" * 64, env_names=tuple(NAMES), files=(str(workspace),), workspace=str(workspace),
        conf_path=str(workspace / "run" / "supervisord.conf"),
        pidfile=str(workspace / "run" / "supervisord.pid"), conf="[supervisord]\n",
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


def test_a_record_that_cannot_be_written_does_not_fail_the_boot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from config.settings import load_settings
    from machine.warm_start import leave_head_start
    from services.plan import make_plan

    settings = load_settings({"MACHINE_WORKSPACE": str(tmp_path), "COMFYUI_CPU_ONLY": "true"})
    plan = make_plan(settings, [], "/agent/python")
    leave_head_start(settings, plan)
    assert read_record(record_path(tmp_path)) is not None
    # Something in the way (as a full disk would be): the boot goes on, the next starts as usual.
    record_path(tmp_path).unlink()
    record_path(tmp_path).mkdir()
    leave_head_start(settings, plan)
    assert "head-start record not written" in caplog.text
    assert read_record(record_path(tmp_path)) is None
