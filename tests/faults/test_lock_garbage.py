"""A comfy-machine.lock of any other shape or garbage is taken as absent: a warning, and the
install rebuilds it. Never an internal error (AttributeError on `[].get`, say)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from services.install.installer import Installer, InstallInputs
from services.install.lock import Lock, LockedNode, LockedRepo, read_lock, write_lock
from tests.integration.test_installer import Steps, make_repo, wheels  # noqa: F401

SHA = "a" * 40


def _valid() -> dict[str, object]:
    lock = Lock("hash", LockedRepo("file:///c", "v1", SHA), {"n": LockedNode("u", "v1", SHA)})
    return json.loads(lock.to_json())


def _with(**changes: object) -> bytes:
    return json.dumps({**_valid(), **changes}).encode()


GARBAGE = {
    "a list": b"[]",
    "a string": b'"x"',
    "null": b"null",
    "a number": b"1e999",
    "nodes as a list": b'{"nodes": []}',
    "empty": b"",
    "truncated": json.dumps(_valid()).encode()[:60],
    "binary": bytes(range(256)) * 4,
    "latin-1": '{"inputs_hash": "\xe9"}'.encode("latin-1"),
    "nested too deeply": b"[" * 100_000,
    "another version": _with(version=2),
    "comfyui as a list": _with(comfyui=[]),
    "comfyui without commit": _with(comfyui={"url": "u", "ref": "r"}),
    "commit not a commit": _with(comfyui={"url": "u", "ref": "r", "commit": "--upload-pack=x"}),
    "node as a string": _with(nodes={"n": "x"}),
    "node with an unknown key": _with(nodes={"n": {"url": "u", "ref": "r", "commit": SHA,
                                                  "evil": 1}}),
    "node with an unknown status": _with(nodes={"n": {"url": "u", "ref": "r", "commit": SHA,
                                                      "status": "bogus"}}),
    "enabled as a string": _with(nodes={"n": {"url": "u", "ref": "r", "commit": SHA,
                                              "enabled": "yes"}}),
    "packages as a list": _with(packages=["torch"]),
    "package version as a number": _with(packages={"torch": 2}),
    "inputs_hash as a number": _with(inputs_hash=1),
}


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_absent_with_a_warning(
    tmp_path: Path, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "comfy-machine.lock"
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="services.install.lock"):
        assert read_lock(path) is None
    assert [r.getMessage() for r in caplog.records] == ["lock unreadable, rebuilding it"]


def test_a_valid_lock_reads_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "comfy-machine.lock"
    lock = Lock("hash", LockedRepo("file:///c", "v1", SHA), {"n": LockedNode("u", "v1", "")})
    write_lock(path, lock)
    assert read_lock(path) == lock
    assert path.stat().st_mode & 0o777 == 0o640
    assert read_lock(tmp_path / "missing.lock") is None
    assert not caplog.records  # a missing lock is no news


@pytest.mark.parametrize("name", ["a list", "nodes as a list", "binary", "truncated"])
def test_install_over_a_garbage_lock_rebuilds_it(
    tmp_path: Path, wheels: Path, name: str  # noqa: F811
) -> None:
    comfyui = make_repo(tmp_path / "src" / "ComfyUI", {"main.py": "", "requirements.txt": "tiny\n"})
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "comfy-machine.lock").write_bytes(GARBAGE[name])
    inputs = InstallInputs(
        comfyui_url=comfyui, comfyui_ref="HEAD", install_path=ws / "ComfyUI", nodes=(),
        python=ws / "venv" / "bin" / "python", venv=ws / "venv", base_python=sys.executable,
        protected=(), on_conflict="fail", install_py_timeout=30, workers=1, workspace=ws,
        min_free_bytes=0,
    )
    report = Installer(inputs, Steps()).run()
    lock = read_lock(ws / "comfy-machine.lock")
    assert lock is not None and lock.comfyui.commit == report.comfyui_commit
