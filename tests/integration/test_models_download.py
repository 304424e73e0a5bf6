"""Model fetching against a real local HTTP server and real files (no mocks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.models import ModelEntry, build_model_specs
from health.checks import models_report
from services.models.download import FetchOptions
from services.models.fetcher import ModelFetcher
from services.state import MachineState
from tests.integration.test_models_server import FileServer
from tests.support import short_tmpdir

MIB = 1 << 20


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(root: Path) -> Iterator[FileServer]:
    files = root / "served"
    files.mkdir()
    srv = FileServer(files).start()
    yield srv
    srv.stop()


def serve(server: FileServer, name: str, size: int) -> str:
    data = os.urandom(size)
    (server.root / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def leave_partial(dest: Path, data: bytes, meta: dict) -> None:
    """What an interrupted earlier process leaves: the .part file and its metadata."""
    Path(str(dest) + ".part").write_bytes(data)
    Path(str(dest) + ".part.json").write_text(json.dumps(meta))


def nonempty_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size]


def fetcher(
    root: Path, *entries: dict, environ: dict[str, str] | None = None, retries: int = 3
) -> tuple[ModelFetcher, MachineState]:
    specs, problems = build_model_specs([ModelEntry(**e) for e in entries])
    assert not problems
    state = MachineState()
    options = FetchOptions(retries=retries, backoff_s=0.01)
    return ModelFetcher(specs, root / "models", state, 2, options, environ or {}), state


async def test_download_verifies_and_warm_boot_trusts_the_record(
    root: Path, server: FileServer
) -> None:
    digest = serve(server, "a.safetensors", 3 * MIB + 5)
    entry = {
        "url": server.url("files", "a.safetensors"),
        "folder": "checkpoints",
        "sha256": digest,
        "size": 3 * MIB + 5,
    }
    f, state = fetcher(root, entry)
    assert await f.run() == []
    model = state.models["checkpoints/a.safetensors"]
    dest = root / "models" / "checkpoints" / "a.safetensors"
    assert model.status == "verified" and model.verified_sha256 == digest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    assert not list(dest.parent.glob("*.part*"))
    assert state.download_bytes_total == 3 * MIB + 5
    # Warm: same size and mtime as recorded -> trusted without hashing. Prove it by changing
    # the content in place and restoring the mtime: the record (not a re-hash) decides.
    st = dest.stat()
    with dest.open("r+b") as fh:
        fh.write(b"\0" * 16)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    f2, state2 = fetcher(root, entry)
    assert await f2.run() == []
    assert state2.models[model.name].status == "verified" and state2.download_bytes_total == 0
    # A changed mtime makes it hash again, find the damage, and fetch the file anew.
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    f3, state3 = fetcher(root, entry)
    assert await f3.run() == []
    assert state3.download_bytes_total == 3 * MIB + 5
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


async def test_dropped_connection_resumes_with_range(root: Path, server: FileServer) -> None:
    digest = serve(server, "b.safetensors", 4 * MIB)
    server.drops["b.safetensors"] = 1
    f, state = fetcher(
        root, {"url": server.url("drop", "b.safetensors"), "folder": "loras", "sha256": digest}
    )
    assert await f.run() == []
    assert state.models["loras/b.safetensors"].status == "verified"
    ranges = [r for p, r in server.ranges if p.endswith("b.safetensors")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1] != "bytes=0-", ranges
    # Only the missing half came the second time.
    assert state.download_bytes_total == 4 * MIB


async def test_partial_file_resumes_across_processes(root: Path, server: FileServer) -> None:
    digest = serve(server, "c.bin", 2 * MIB)
    dest = root / "models" / "vae" / "c.bin"
    dest.parent.mkdir(parents=True)
    data = (server.root / "c.bin").read_bytes()
    url = server.url("files", "c.bin")
    st = (server.root / "c.bin").stat()
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    leave_partial(dest, data[:MIB], {"url": url, "etag": etag, "total": 2 * MIB})
    f, state = fetcher(root, {"url": url, "folder": "vae", "sha256": digest})
    assert await f.run() == []
    assert server.ranges[-1][1] == f"bytes={MIB}-"
    assert state.download_bytes_total == MIB
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


async def test_server_without_range_restarts_cleanly(root: Path, server: FileServer) -> None:
    digest = serve(server, "d.pt", MIB + 7)
    dest = root / "models" / "vae" / "d.pt"
    dest.parent.mkdir(parents=True)
    url = server.url("norange", "d.pt")
    leave_partial(dest, b"garbage" * 1000, {"url": url, "etag": '"x"'})
    f, _ = fetcher(root, {"url": url, "folder": "vae", "sha256": digest})
    assert await f.run() == []
    assert server.ranges[-1][1] is not None  # it asked for a range and got the whole file
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest


async def test_wrong_content_is_removed_and_named(root: Path, server: FileServer) -> None:
    digest = serve(server, "e.safetensors", MIB)
    f, state = fetcher(
        root,
        {"url": server.url("wrong", "e.safetensors"), "folder": "checkpoints", "sha256": digest},
    )
    failed = await f.run()
    assert [m.name for m in failed] == ["checkpoints/e.safetensors"]
    error = failed[0].error or ""
    assert "checkpoints/e.safetensors" in error and f"expected {digest}" in error
    assert "got " in error and "removed" in error
    assert not list((root / "models" / "checkpoints").iterdir())
    code, body = models_report(state, 0.0)
    assert code == 503 and body["status"] == "failed"
    assert body["models"][0]["status"] == "failed"


async def test_size_mismatch_is_refused_before_download(root: Path, server: FileServer) -> None:
    serve(server, "f.ckpt", MIB)
    f, state = fetcher(
        root, {"url": server.url("files", "f.ckpt"), "folder": "checkpoints", "size": 2 * MIB}
    )
    failed = await f.run()
    assert f"expected {2 * MIB} bytes, got {MIB}" in (failed[0].error or "")
    assert state.download_bytes_total == 0


async def test_token_is_sent_and_never_shown(
    root: Path, server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    serve(server, "g.safetensors", MIB)
    entry = {"url": server.url("auth", "g.safetensors"), "folder": "loras", "auth_env": "HF_TOKEN"}
    # No token: a clear 401 with the hint.
    f, state = fetcher(root, entry)
    failed = await f.run()
    assert "HTTP 401" in (failed[0].error or "") and "missing token? HF_TOKEN is not set" in (
        failed[0].error or ""
    )
    # A wrong token: refused, and the token is in no error, log line or health body.
    f, state = fetcher(root, entry, environ={"HF_TOKEN": "tok-WRONG-1234"})
    failed = await f.run()
    assert "token in HF_TOKEN was refused" in (failed[0].error or "")
    body = json.dumps(models_report(state, 0.0)[1])
    # The right token: downloaded.
    f, state = fetcher(root, entry, environ={"HF_TOKEN": server.token})
    assert await f.run() == []
    body += json.dumps(models_report(state, 0.0)[1])
    for secret in ("tok-WRONG-1234", server.token):
        assert secret not in body and secret not in caplog.text


async def test_not_found_and_file_urls(root: Path, server: FileServer) -> None:
    source = root / "local.safetensors"
    source.write_bytes(b"x" * 1000)
    f, state = fetcher(
        root,
        {"url": server.url("files", "nope.safetensors"), "folder": "loras", "required": False},
        {
            "url": source.as_uri(),
            "folder": "embeddings",
            "sha256": hashlib.sha256(b"x" * 1000).hexdigest(),
        },
    )
    failed = await f.run()
    assert len(failed) == 1 and "HTTP 404" in (failed[0].error or "")
    assert state.models["embeddings/local.safetensors"].status == "verified"
    assert (root / "models" / "embeddings" / "local.safetensors").read_bytes() == b"x" * 1000
    code, body = models_report(state, 0.0)
    assert code == 200 and body["status"] == "degraded"  # only an optional model failed


async def test_symlink_out_of_the_store_is_refused(root: Path, server: FileServer) -> None:
    serve(server, "h.safetensors", 100)
    outside = root / "outside"
    outside.mkdir()
    (root / "models").mkdir()
    (root / "models" / "loras").symlink_to(outside)
    f, _ = fetcher(root, {"url": server.url("files", "h.safetensors"), "folder": "loras"})
    failed = await f.run()
    assert "models[0] (loras/h.safetensors)" in (failed[0].error or "")
    assert "outside" in (failed[0].error or "") and not list(outside.iterdir())


@pytest.fixture
def small_disk(root: Path) -> Iterator[Path]:
    mount = root / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting its 1 MiB tmpfs needs root and `mount`: run the tests as root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs CAP_SYS_ADMIN "
            "(in Docker: --cap-add SYS_ADMIN)"
        )
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


async def test_full_disk(small_disk: Path, server: FileServer) -> None:
    serve(server, "big.safetensors", 3 * MIB)
    specs, _ = build_model_specs(
        [
            ModelEntry(url=server.url("files", "big.safetensors"), folder="checkpoints"),
            ModelEntry(url=server.url("chunked", "big.safetensors"), folder="loras"),
        ]
    )
    state = MachineState()
    failed = await ModelFetcher(specs, small_disk, state, 1, FetchOptions(retries=0), {}).run()
    errors = {m.name: m.error or "" for m in failed}
    # Known size: refused before writing, with the numbers.
    assert "not enough disk space" in errors["checkpoints/big.safetensors"]
    assert f"({3 * MIB} bytes)" in errors["checkpoints/big.safetensors"]
    # Unknown size (chunked): the disk fills while writing; the partial file is removed.
    assert "disk filled up" in errors["loras/big.safetensors"]
    assert not nonempty_files(small_disk)


def test_models_command_exit_codes(root: Path, server: FileServer) -> None:
    digest = serve(server, "i.safetensors", 1000)
    toml = root / "machine.toml"
    toml.write_text(
        f'[[models]]\nurl = "{server.url("files", "i.safetensors")}"\nfolder = "checkpoints"\n'
        f'sha256 = "{digest}"\n\n'
        f'[[models]]\nurl = "{server.url("files", "missing.safetensors")}"\nfolder = "vae"\n'
    )
    env = {**os.environ, "MACHINE_CONFIG": str(toml), "MACHINE_WORKSPACE": str(root / "ws")}
    proc = subprocess.run(
        [sys.executable, "-m", "machine", "models"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "required model vae/missing.safetensors failed" in proc.stderr
    assert "HTTP 404" in proc.stderr
    assert (root / "ws" / "models" / "checkpoints" / "i.safetensors").is_file()
    assert (root / "ws" / "run" / "extra_model_paths.yaml").is_file()
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {line["name"]: line["status"] for line in lines} == {
        "checkpoints/i.safetensors": "verified",
        "vae/missing.safetensors": "failed",
    }
    (server.root / "missing.safetensors").write_bytes(b"now here")
    proc = subprocess.run(
        [sys.executable, "-m", "machine", "models"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_models_command_piped_prints_each_line_once(root: Path, server: FileServer) -> None:
    """Off a terminal every line comes once: one JSON line per finished model, then the
    summary (the final flush after the fetch used to print every model a second time)."""
    digest = serve(server, "j.safetensors", 2000)
    local = root / "k.bin"
    local.write_bytes(b"k" * 3000)
    toml = root / "machine.toml"
    toml.write_text(
        f'[[models]]\nurl = "{server.url("files", "j.safetensors")}"\nfolder = "checkpoints"\n'
        f'sha256 = "{digest}"\n\n'
        f'[[models]]\nurl = "{local.as_uri()}"\nfolder = "vae"\n'
    )
    env = {**os.environ, "MACHINE_CONFIG": str(toml), "MACHINE_WORKSPACE": str(root / "ws")}
    for _ in range(2):  # downloaded, then verified warm from the record
        proc = subprocess.run(
            [sys.executable, "-m", "machine", "models"],
            env=env,
            capture_output=True,  # stdout is a pipe, not a terminal
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == len(set(lines)), proc.stdout
        names = [json.loads(line)["name"] for line in lines if line.startswith("{")]
        assert sorted(names) == ["checkpoints/j.safetensors", "vae/k.bin"], proc.stdout
        # k.bin has no sha256 or size: on disk, but said to be unverified.
        assert len(lines) == 3, proc.stdout
        assert lines[-1].startswith("1 model(s) verified, 1 unverified"), proc.stdout
