"""The model store against a hostile or broken server and a hostile disk: only whole, 2xx
(200, or 206 to a resume) bodies are kept; the store's own names stay its own; a record or
partial-download metadata of any shape is never trusted nor crashes the fetch; a full disk
fails cleanly and a later attempt succeeds once space returns.

Every server here is a real aiohttp server (or, for an unframed body aiohttp would not send,
a raw asyncio one) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from config.models import RECORD_NAME, ModelEntry, build_model_specs
from health.checks import models_report
from health.metrics import MachineCollector
from services.models.download import FetchOptions
from services.models.fetcher import ModelFetcher
from services.state import MachineState
from tests.support import short_tmpdir

KIB = 1 << 10
MIB = 1 << 20
DISK_FULL = re.compile(r"workspace disk full: (\d+) bytes free")


@dataclass
class Served:
    """What the test server hands out, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    drops: dict[str, int] = field(default_factory=dict)  # name -> answers cut mid-body
    on_request: dict[str, Callable[[int], None]] = field(default_factory=dict)
    port: int = 0

    def url(self, route: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{route}/{name}"

    def put(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return hashlib.sha256(data).hexdigest()

    def count(self, name: str) -> int:
        return sum(1 for path, _ in self.requests if path.endswith("/" + name))


def _app(served: Served) -> web.Application:
    def seen(request: web.Request) -> bytes:
        name = request.match_info["name"]
        served.requests.append((request.path, request.headers.get("Range")))
        if name in served.on_request:
            served.on_request[name](served.count(name))
        if name not in served.files:
            raise web.HTTPNotFound()
        return served.files[name]

    async def status(request: web.Request) -> web.StreamResponse:
        seen(request)
        code = int(request.match_info["code"])
        # No Location on a redirect: aiohttp cannot follow it and hands the answer back.
        body = None if code in (204, 304) else f"status {code}".encode()
        return web.Response(status=code, body=body)

    async def whole(request: web.Request) -> web.StreamResponse:
        return web.Response(body=seen(request), content_type="application/octet-stream")

    async def chunked(request: web.Request) -> web.StreamResponse:
        data = seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(data), 64 * KIB):
            await resp.write(data[start : start + 64 * KIB])
        await resp.write_eof()
        return resp

    async def chunked_short(request: web.Request) -> web.StreamResponse:
        """Properly framed (the last chunk comes), but only half the file."""
        data = seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        await resp.write_eof()
        return resp

    async def short(request: web.Request) -> web.StreamResponse:
        """Content-Length says the whole file; the connection closes after half of it."""
        data = seen(request)
        name = request.match_info["name"]
        if served.drops.get(name, 1) <= 0:
            return web.Response(body=data)
        served.drops[name] = served.drops.get(name, 1) - 1
        resp = web.StreamResponse(headers={"ETag": '"v1"', "Accept-Ranges": "bytes"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    async def partial(request: web.Request) -> web.StreamResponse:
        """206 with the whole file as its range, asked or not."""
        data = seen(request)
        return web.Response(
            status=206,
            body=data,
            headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
        )

    app = web.Application()
    app.router.add_get("/status/{code}/{name}", status)
    app.router.add_get("/whole/{name}", whole)
    app.router.add_get("/chunked/{name}", chunked)
    app.router.add_get("/chunked-short/{name}", chunked_short)
    app.router.add_get("/short/{name}", short)
    app.router.add_get("/partial/{name}", partial)
    return app


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(aiohttp_server: Callable[..., Awaitable[web.Server]]) -> Served:
    result = Served()
    server = await aiohttp_server(_app(result), host="127.0.0.1")
    result.port = server.port
    return result


def make(models_path: Path, *entries: dict, retries: int = 0) -> tuple[ModelFetcher, MachineState]:
    specs, problems = build_model_specs([ModelEntry(**e) for e in entries])
    assert not problems, problems
    state = MachineState()
    options = FetchOptions(retries=retries, backoff_s=0.01, read_timeout_s=10)
    return ModelFetcher(specs, models_path, state, 2, options, {}), state


def leave_partial(dest: Path, data: bytes, meta: bytes) -> None:
    """What an interrupted earlier process leaves: ``<file>.part`` and ``<file>.part.json``."""
    Path(f"{dest}.part").write_bytes(data)
    Path(f"{dest}.part.json").write_bytes(meta)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# 1. The store's own names are refused in a manifest.


@pytest.mark.parametrize(
    ("entries", "bad"),
    [
        # Old: x.bin.part was x.bin's partial file, so x.bin ended up with the other model's
        # bytes while the record said verified.
        (
            [
                {"url": "https://h/x.bin", "folder": "vae"},
                {"url": "https://h/y.bin", "folder": "vae", "filename": "x.bin.part"},
            ],
            "models[1].filename",
        ),
        ([{"url": "https://h/x.bin.part.json", "folder": "vae"}], "models[0].filename"),
        ([{"url": "https://h/m", "folder": "vae", "filename": "sub/x.PART"}], "models[0].filename"),
        (
            [{"url": "https://h/m", "folder": "vae", "filename": "a.part/b.bin"}],
            "models[0].filename",
        ),
        ([{"url": "https://h/m", "folder": "vae", "filename": RECORD_NAME}], "models[0].filename"),
        # A model is never empty: a size of 0 or the sha256 of nothing would keep one.
        ([{"url": "https://h/m.bin", "folder": "vae", "size": 0}], "models[0].size"),
        (
            [
                {
                    "url": "https://h/m.bin",
                    "folder": "vae",
                    "sha256": hashlib.sha256(b"").hexdigest().upper(),
                }
            ],
            "models[0].sha256",
        ),
    ],
)
def test_store_names_are_refused_naming_the_entry(entries: list[dict], bad: str) -> None:
    specs, problems = build_model_specs([ModelEntry(**e) for e in entries])
    assert [p.source for p in problems] == [bad], problems
    assert len(specs) == len(entries) - 1


def test_store_names_exit_2_naming_the_entry(root: Path) -> None:
    toml = root / "machine.toml"
    toml.write_text(
        '[[models]]\nurl = "https://h/x.bin"\nfolder = "vae"\n\n'
        '[[models]]\nurl = "https://h/y.bin"\nfolder = "vae"\nfilename = "x.bin.part"\n'
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
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "models[1].filename" in proc.stderr and "x.bin.part" in proc.stderr
    assert not (root / "ws" / "models" / "vae").exists()


# 2. Only 200 (or 206 to a resume) is stored.


@pytest.mark.parametrize("code", [201, 202, 203, 204, 205, 300, 301, 302, 303, 304, 307, 308])
@pytest.mark.parametrize("declared", ["nothing", "size"])
async def test_non_200_answers_are_never_stored(
    root: Path, served: Served, code: int, declared: str
) -> None:
    body = b"" if code in (204, 304) else f"status {code}".encode()
    served.put("m.bin", b"the real model")
    entry: dict = {"url": served.url(f"status/{code}", "m.bin"), "folder": "vae"}
    if declared == "size" and body:
        entry["size"] = len(body)  # even a size that fits the bogus body does not keep it
    f, state = make(root / "models", entry)
    failed = await f.run()
    error = failed[0].error or "" if failed else ""
    assert failed and f"HTTP {code}" in error and "vae/m.bin" in error, state.models
    assert state.models["vae/m.bin"].status == "failed"
    assert files_under(root / "models") == []


# 3. An empty or cut-off body is never kept.


@pytest.mark.parametrize("route", ["whole", "chunked"])
async def test_an_empty_body_is_never_kept(root: Path, served: Served, route: str) -> None:
    served.put("e.bin", b"")
    f, state = make(root / "models", {"url": served.url(route, "e.bin"), "folder": "vae"})
    failed = await f.run()
    assert failed and "empty" in (failed[0].error or ""), state.models
    assert files_under(root / "models") == []


@pytest.mark.parametrize("declared", ["nothing", "size", "sha256"])
async def test_a_body_shorter_than_its_content_length_is_never_kept(
    root: Path, served: Served, declared: str
) -> None:
    data = os.urandom(300 * KIB)
    digest = served.put("s.bin", data)
    served.drops["s.bin"] = 99  # every answer is cut
    entry: dict = {"url": served.url("short", "s.bin"), "folder": "vae"}
    if declared == "size":
        entry["size"] = len(data)
    elif declared == "sha256":
        entry["sha256"] = digest
    f, state = make(root / "models", entry, retries=2)
    failed = await f.run()
    assert failed and "gave up after 3 attempts" in (failed[0].error or ""), state.models
    assert not (root / "models" / "vae" / "s.bin").exists()


async def test_a_chunked_body_shorter_than_the_declared_size_is_never_kept(
    root: Path, served: Served
) -> None:
    data = os.urandom(200 * KIB)
    served.put("c.bin", data)
    entry = {"url": served.url("chunked-short", "c.bin"), "folder": "vae", "size": len(data)}
    f, _ = make(root / "models", entry, retries=1)
    failed = await f.run()
    assert failed and f"of {len(data)} bytes" in (failed[0].error or "")
    assert not (root / "models" / "vae" / "c.bin").exists()


@pytest.fixture
async def unframed() -> AsyncIterator[tuple[int, bytes]]:
    """A raw HTTP/1.1 server answering 200 with no Content-Length and no chunking: the body
    ends when the connection closes, so a cut-off one looks whole. It sends half a file."""
    data = os.urandom(100 * KIB)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + data[: len(data) // 2])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], data
    server.close()
    await server.wait_closed()


async def test_an_unframed_body_is_kept_only_with_something_to_check(
    root: Path, unframed: tuple[int, bytes]
) -> None:
    port, data = unframed
    url = f"http://127.0.0.1:{port}/u.bin"
    # Neither sha256 nor size: nothing could tell the half file from a whole one.
    f, _ = make(root / "models", {"url": url, "folder": "vae"})
    failed = await f.run()
    assert failed and "Content-Length" in (failed[0].error or "")
    assert "add sha256" in (failed[0].error or "")
    # With the size declared, the missing half is seen.
    f, _ = make(root / "models", {"url": url, "folder": "vae", "size": len(data)})
    failed = await f.run()
    assert failed and f"of {len(data)} bytes" in (failed[0].error or "")
    assert not (root / "models" / "vae" / "u.bin").exists()


# 4. A model with neither sha256 nor size: kept only whole from a 200, shown unverified.


async def test_a_model_without_sha256_or_size_is_unverified_in_health_and_metrics(
    root: Path, served: Served
) -> None:
    data = os.urandom(300 * KIB)
    digest = served.put("n.bin", data)
    served.drops["n.bin"] = 1  # the first answer is cut: the retry starts over, no Range
    f, state = make(
        root / "models",
        {"url": served.url("short", "n.bin"), "folder": "vae"},
        {"url": served.url("whole", "n.bin"), "folder": "loras", "sha256": digest},
        retries=2,
    )
    assert await f.run() == []
    model = state.models["vae/n.bin"]
    assert model.status == "unverified" and model.verified_sha256 == digest
    assert model.bytes_done == model.bytes_total == len(data)
    assert (root / "models" / "vae" / "n.bin").read_bytes() == data
    assert [r for p, r in served.requests if p.startswith("/short/")] == [None, None]
    code, body = models_report(state, 0.0)
    assert code == 200 and body["status"] == "ready"  # present: it does not hold readiness
    entry = next(m for m in body["models"] if m["name"] == "vae/n.bin")
    assert entry["status"] == "unverified" and digest in entry["warning"]
    assert len(body["warnings"]) == 1 and "vae/n.bin is unverified" in body["warnings"][0]
    assert next(m for m in body["models"] if m["name"] == "loras/n.bin")["warning"] is None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MachineCollector(state))

    def sample(name: str, model: str | None = None) -> float | None:
        labels = {"model": model} if model else {}
        return registry.get_sample_value(f"comfy_machine_{name}", labels)

    assert sample("model_verified", "vae/n.bin") == 0
    assert sample("model_unverified", "vae/n.bin") == 1
    assert sample("model_verified", "loras/n.bin") == 1
    assert sample("model_unverified", "loras/n.bin") == 0
    assert sample("models_required_missing") == 0
    # A warm boot: still unverified, from the record.
    f, state = make(root / "models", {"url": served.url("whole", "n.bin"), "folder": "vae"})
    assert await f.run() == [] and state.models["vae/n.bin"].status == "unverified"


async def test_a_partial_answer_is_not_kept_without_sha256_or_size(
    root: Path, served: Served
) -> None:
    served.put("p.bin", os.urandom(10 * KIB))
    f, _ = make(root / "models", {"url": served.url("partial", "p.bin"), "folder": "vae"})
    failed = await f.run()
    assert failed and "HTTP 206" in (failed[0].error or "")
    assert files_under(root / "models") == []


@pytest.mark.parametrize("recorded", [True, False])
async def test_an_empty_file_on_disk_is_never_present(
    root: Path, served: Served, recorded: bool
) -> None:
    """An empty file (and the record entry the old code wrote for it) is fetched again; if
    the fetch fails the model is failed, not present."""
    dest = root / "models" / "vae" / "z.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"")
    if recorded:
        st = dest.stat()
        sha = hashlib.sha256(b"").hexdigest()
        (root / "models" / RECORD_NAME).write_text(
            json.dumps({"vae/z.bin": {"size": 0, "mtime_ns": st.st_mtime_ns, "sha256": sha}})
        )
    f, state = make(root / "models", {"url": served.url("whole", "z.bin"), "folder": "vae"})
    failed = await f.run()  # nothing served: 404
    assert failed and state.models["vae/z.bin"].status == "failed"
    assert not dest.exists()
    code, body = models_report(state, 0.0)
    assert code == 503 and body["status"] == "failed"
    data = os.urandom(KIB)
    served.put("z.bin", data)
    f, state = make(root / "models", {"url": served.url("whole", "z.bin"), "folder": "vae"})
    assert await f.run() == [] and dest.read_bytes() == data


# 5. A verified record or a .part.json of any shape is treated as absent.

SHAPES = {
    "list": b"[]",
    "string": b'"x"',
    "null": b"null",
    "number": b"42",
    "files-list": b'{"files": []}',
    "entry-list": b'{"vae/r.bin": []}',
    "entry-types": b'{"vae/r.bin": {"size": "1", "mtime_ns": null, "sha256": 7}}',
    "entry-bool": b'{"vae/r.bin": {"size": true, "mtime_ns": 1, "sha256": "ab"}}',
    "truncated": b'{"vae/r.bin": {"size": 1024, "mtime_',
    "binary": bytes(range(256)) * 4,
    "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_record_of_any_shape_is_treated_as_absent(
    root: Path, served: Served, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(64 * KIB)
    digest = served.put("r.bin", data)
    dest = root / "models" / "vae" / "r.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data)
    record = root / "models" / RECORD_NAME
    record.write_bytes(SHAPES[shape])
    caplog.set_level(logging.WARNING)
    f, state = make(
        root / "models",
        {"url": served.url("whole", "r.bin"), "folder": "vae", "sha256": digest},
    )
    assert await f.run() == []  # re-hashed, not downloaded, nothing escaped
    assert state.models["vae/r.bin"].status == "verified"
    assert state.download_bytes_total == 0 and served.requests == []
    assert "verified record unusable" in caplog.text
    assert json.loads(record.read_text())["vae/r.bin"]["sha256"] == digest  # rewritten


async def test_a_record_that_is_a_fifo_does_not_hang_the_fetch(
    root: Path, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(KIB)
    digest = served.put("r.bin", data)
    (root / "models").mkdir()
    os.mkfifo(root / "models" / RECORD_NAME)
    caplog.set_level(logging.WARNING)
    f, _ = make(
        root / "models",
        {"url": served.url("whole", "r.bin"), "folder": "vae", "sha256": digest},
    )
    async with asyncio.timeout(20):
        assert await f.run() == []
    (warning,) = [r for r in caplog.records if r.getMessage().startswith("verified record")]
    assert warning.fields["error"] == "not a regular file"  # type: ignore[attr-defined]


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_part_json_of_any_shape_restarts_the_download(
    root: Path, served: Served, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(128 * KIB)
    digest = served.put("q.bin", data)
    dest = root / "models" / "vae" / "q.bin"
    dest.parent.mkdir(parents=True)
    leave_partial(dest, b"\0" * 1000, SHAPES[shape])  # not a prefix of the file
    caplog.set_level(logging.WARNING)
    f, state = make(
        root / "models",
        {"url": served.url("whole", "q.bin"), "folder": "vae", "sha256": digest},
    )
    assert await f.run() == [], state.models
    assert dest.read_bytes() == data and served.requests == [("/whole/q.bin", None)]
    assert files_under(root / "models") == [RECORD_NAME, "vae/q.bin"]
    assert "partial download not resumed" in caplog.text


async def test_a_part_json_with_a_total_below_the_part_restarts(root: Path, served: Served) -> None:
    """A .part longer than its recorded total would ask for a range past the end (416)
    forever; it is dropped instead."""
    data = os.urandom(64 * KIB)
    digest = served.put("t.bin", data)
    dest = root / "models" / "vae" / "t.bin"
    dest.parent.mkdir(parents=True)
    url = served.url("whole", "t.bin")
    meta = json.dumps({"url": url, "etag": '"e"', "total": 5}).encode()
    leave_partial(dest, b"\0" * (len(data) + 10), meta)
    f, _ = make(root / "models", {"url": url, "folder": "vae", "sha256": digest})
    assert await f.run() == [] and dest.read_bytes() == data
    assert served.requests == [("/whole/t.bin", None)]


# 6. A full disk.


@pytest.fixture
def small_disk(root: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so ENOSPC comes for real."""
    mount = root / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a 4 MiB tmpfs needs root and `mount`")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A filler file leaving about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    filler.write_bytes(b"\1" * (free - leave))
    return filler


async def test_full_disk_fails_cleanly_and_a_later_run_succeeds(
    small_disk: Path, served: Served
) -> None:
    data = os.urandom(2 * MIB)
    digest = served.put("big.bin", data)
    store = small_disk / "models"
    filler = fill(small_disk, leave=MIB)
    # Chunked (no size known before writing): the disk fills while writing.
    f, state = make(
        store, {"url": served.url("chunked", "big.bin"), "folder": "vae", "sha256": digest}
    )
    failed = await f.run()
    assert failed and state.models["vae/big.bin"].status == "failed"
    error = failed[0].error or ""
    found = DISK_FULL.search(error)
    assert found and "vae/big.bin" in error, error
    assert int(found[1]) < MIB
    # The partial file and its metadata go with the error: nothing holds the space.
    assert files_under(store) == []
    # Space returns: the same fetcher's next run succeeds, in this process.
    filler.unlink()
    assert await f.run() == []
    assert state.models["vae/big.bin"].status == "verified"
    assert (store / "vae" / "big.bin").read_bytes() == data
    assert state.models["vae/big.bin"].bytes_total == len(data)


async def test_full_disk_is_retried_and_succeeds_when_space_returns(
    small_disk: Path, served: Served
) -> None:
    data = os.urandom(2 * MIB)
    digest = served.put("big.bin", data)
    filler = fill(small_disk, leave=MIB)
    # The second request frees the space: the fetcher's own retry then succeeds.
    served.on_request["big.bin"] = lambda n: filler.unlink() if n == 2 else None
    f, state = make(
        small_disk / "models",
        {"url": served.url("chunked", "big.bin"), "folder": "vae", "sha256": digest},
        retries=2,
    )
    assert await f.run() == [], state.models["vae/big.bin"].error
    assert served.count("big.bin") == 2
    model = state.models["vae/big.bin"]
    assert model.status == "verified" and model.bytes_done == model.bytes_total == len(data)


async def test_full_disk_before_writing_names_the_free_bytes(
    small_disk: Path, served: Served
) -> None:
    data = os.urandom(MIB)
    served.put("k.bin", data)
    f, _ = make(
        small_disk / "models",
        {"url": served.url("whole", "k.bin"), "folder": "vae", "size": len(data)},
    )
    failed = await f.run()
    found = DISK_FULL.search(failed[0].error or "")
    assert found, failed[0].error
    assert abs(int(found[1]) - shutil.disk_usage(small_disk).free) < MIB
    assert files_under(small_disk / "models") == []


async def test_full_disk_on_a_file_copy(small_disk: Path, root: Path) -> None:
    source = root / "local.bin"
    source.write_bytes(os.urandom(2 * MIB))
    fill(small_disk, leave=MIB)
    f, _ = make(small_disk / "models", {"url": source.as_uri(), "folder": "vae"})
    failed = await f.run()
    assert failed and DISK_FULL.search(failed[0].error or ""), failed[0].error
    assert files_under(small_disk / "models") == []


@pytest.mark.parametrize("route", ["whole", "file"])
async def test_a_planted_part_symlink_writes_nothing_outside_the_store(
    root: Path, served: Served, route: str
) -> None:
    """A dangling ``<file>.part`` symlink pointing out of the store: the download replaces
    the link, it never creates or writes the file it points at."""
    data = os.urandom(16 * KIB)
    digest = served.put("l.bin", data)
    source = root / "l.bin"
    source.write_bytes(data)
    outside = root / "outside"
    dest = root / "models" / "vae" / "l.bin"
    dest.parent.mkdir(parents=True)
    os.symlink(outside, f"{dest}.part")
    url = source.as_uri() if route == "file" else served.url("whole", "l.bin")
    f, _ = make(root / "models", {"url": url, "folder": "vae", "sha256": digest})
    assert await f.run() == []
    assert dest.read_bytes() == data and not dest.is_symlink()
    assert "outside" not in os.listdir(root)
