"""The operator's view from the command line and the log route: instance logs read from real
files (tail, bounds, follow across rotation), `comfy-machine logs [-f]` and `status` on a real
node, the table on a terminal (a real pty) and JSON off one."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient

from health.server import create_app
from services.logfile import MAX_FOLLOW_BYTES
from services.state import InstanceState
from tests.integration.test_cli import run_cli
from tests.support import Node, squat, wait_until
from tests.unit.test_checks import instance, make_ready, node

LOG_ROUTE = "/health/comfyui/instances/0/log"
# The log route answers only holders of MACHINE_HEALTH_TOKEN (tests/security covers 401/403).
TOKEN = "log-reader-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def log_client(aiohttp_client, log: Path) -> TestClient:  # type: ignore[no-untyped-def]
    inst = make_ready(instance(0))
    state = node(InstanceState(plan=replace(inst.plan, log_path=log)))
    return await aiohttp_client(create_app(state, log_token=TOKEN))


async def get(client: TestClient, **params: object) -> tuple[int, dict]:
    resp = await client.get(
        LOG_ROUTE, params={k: str(v) for k, v in params.items()}, headers=AUTH
    )
    return resp.status, await resp.json()


def numbered(first: int, last: int) -> str:
    return "".join(f"line {i}\n" for i in range(first, last + 1))


async def test_tail_is_bounded_and_validated(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "comfyui-gpu0.log"
    client = await log_client(aiohttp_client, log)
    code, body = await get(client)
    assert code == 200 and body["exists"] is False and body["lines"] == []
    log.write_text(numbered(1, 300))
    code, body = await get(client)
    assert code == 200 and body["exists"] and body["name"] == "comfyui-gpu0"
    assert body["lines"] == [f"line {i}" for i in range(201, 301)]  # default 100
    assert body["log_path"] == str(log) and body["offset"] == log.stat().st_size
    assert (await get(client, tail=3))[1]["lines"] == ["line 298", "line 299", "line 300"]
    assert len((await get(client, tail=1000))[1]["lines"]) == 300
    for bad in ("0", "1001", "abc", "-5"):
        code, body = await get(client, tail=bad)
        assert code == 400 and body["status"] == "error" and "tail" in body["error"]
    resp = await client.get("/health/comfyui/instances/7/log", headers=AUTH)
    assert resp.status == 404 and (await resp.json())["known_gpus"] == [0]
    resp = await client.get("/health/comfyui/instances/x/log", headers=AUTH)
    assert resp.status == 400 and "not a GPU index" in (await resp.json())["error"]


async def test_tail_reads_a_bounded_amount(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "comfyui-gpu0.log"
    client = await log_client(aiohttp_client, log)
    # One 3 MiB line (a model dumping a tensor, say): the answer stays small.
    log.write_bytes(b"x" * (3 * 1024 * 1024) + b"\nlast line\n")
    code, body = await get(client, tail=5)
    assert code == 200 and body["lines"] == ["last line"] and body["truncated"] is True
    # Bad bytes never break the JSON answer.
    log.write_bytes(b"caf\xe9 \xff\nok\n")
    assert (await get(client, tail=5))[1]["lines"] == ["caf\ufffd \ufffd", "ok"]


async def test_tail_reaches_into_the_rotated_file(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "comfyui-gpu0.log"
    client = await log_client(aiohttp_client, log)
    (tmp_path / "comfyui-gpu0.log.1").write_text(numbered(1, 50))
    log.write_text(numbered(51, 60))  # supervisord just rotated: the new file is short
    _, body = await get(client, tail=20)
    assert body["lines"] == [f"line {i}" for i in range(41, 61)]


async def test_follow_holds_partial_lines_and_survives_rotation(
    aiohttp_client, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "comfyui-gpu0.log"
    client = await log_client(aiohttp_client, log)
    log.write_text(numbered(1, 3))
    _, body = await get(client, tail=10)

    async def follow(body: dict) -> dict:
        code, nxt = await get(client, after=body["offset"], inode=body["inode"])
        assert code == 200
        return nxt

    body = await follow(body)
    assert body["lines"] == []
    with log.open("a") as f:
        f.write("a\nb\npart")
    body = await follow(body)
    assert body["lines"] == ["a", "b"]  # "part" waits for its newline
    with log.open("a") as f:
        f.write("ial\nunread\n")
    body = await follow(body)
    assert body["lines"] == ["partial", "unread"]
    # Rotation between two polls: the end of the old file comes first, then the new file.
    with log.open("a") as f:
        f.write("last of old\n")
    log.rename(tmp_path / "comfyui-gpu0.log.1")
    log.write_text("first of new\n")
    body = await follow(body)
    assert body["lines"] == ["last of old"]
    body = await follow(body)
    assert body["lines"] == ["first of new"]
    # A truncated file (copytruncate) restarts from its beginning too.
    log.write_text("after truncate\n")
    body = await follow({**body, "offset": 10_000})
    assert body["lines"] == ["after truncate"]
    # A burst larger than one answer comes in bounded pieces, marked truncated.
    with log.open("a") as f:
        f.write(numbered(1, 40_000))
    body = await follow(body)
    assert body["truncated"] is True and len("\n".join(body["lines"])) <= MAX_FOLLOW_BYTES
    got = list(body["lines"])
    while body["truncated"]:
        body = await follow(body)
        got += body["lines"]
    assert got == [f"line {i}" for i in range(1, 40_001)]
    for bad in ({"after": "-1"}, {"after": "x"}, {"after": "0", "inode": "y"}):
        code, err = await get(client, **bad)
        assert code == 400 and err["status"] == "error"


def test_logs_command_prints_and_follows(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1, MACHINE_HEALTH_TOKEN=TOKEN).start()
    node.wait_ready()
    # Without the token the node refuses, and says how to send it.
    denied = run_cli("logs", "--gpu", "0", "--url", node.url, env={"MACHINE_HEALTH_TOKEN": ""})
    assert denied.returncode == 1 and "Authorization: Bearer" in denied.stderr
    env = {"MACHINE_HEALTH_TOKEN": TOKEN}
    out = run_cli("logs", "--gpu", "0", "--tail", "3", "--url", node.url, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and any("To see the GUI go to" in line for line in lines)
    unknown = run_cli("logs", "--gpu", "7", "--url", node.url, env=env)
    assert unknown.returncode == 1 and "no instance for gpu 7" in unknown.stderr
    bad = run_cli("logs", "--gpu", "0", "--tail", "5000", "--url", node.url, env=env)
    assert bad.returncode == 1 and "tail" in bad.stderr

    follow = subprocess.Popen(
        [sys.executable, "-m", "machine", "logs", "--gpu", "0", "-f", "--url", node.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    seen: list[str] = []
    assert follow.stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(follow.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: any("To see the GUI" in s for s in seen), 10, "the first lines")
        # A crash and restart writes a new start-up into the log: the follower prints it.
        _, body = node.instance(0)
        os.kill(body["pid"], signal.SIGKILL)
        wait_until(lambda: sum("To see the GUI" in s for s in seen) >= 2, 60, "the restart's lines")
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
        reader.join(5)
        for stream in (follow.stdout, follow.stderr):
            if stream is not None:
                stream.close()


def run_on_tty(*args: str, timeout: float = 30) -> tuple[int, str]:
    """Run the CLI with its stdout on a real pseudo-terminal; exit code and output."""
    main, sub = pty.openpty()
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "machine", *args], stdout=sub, stderr=subprocess.PIPE, env=env
    )
    os.close(sub)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([main], [], [], timeout)
            if not ready:
                raise AssertionError(f"no output within {timeout}s")
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def test_status_is_a_table_and_json_on_request(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=2)
    # gpu 1's port is taken: a deterministic not-ready instance with a reason.
    squatter = squat(node.port_start + 1)
    try:
        node.start()
        wait_until(lambda: node.instance(0)[0] == 200, 60, "gpu 0 ready")
        code, text = run_on_tty("status", "--url", node.url)
        assert code == 0, text  # degraded still serves: 200
        lines = text.splitlines()
        assert lines[0] == "node: degraded (phase DEGRADED, HTTP 200), 1/2 instances ready"
        header = lines[1].split()
        assert header[:5] == ["GPU", "NAME", "STATE", "READY", "PORT"] and "RESTARTS" in header
        ready, blocked = lines[2].split(), lines[3].split()
        assert ready[:2] == ["0", "comfyui-gpu0"] and ready[3] == "yes"
        assert ready[4] == str(node.port_start)
        assert blocked[:2] == ["1", "comfyui-gpu1"] and blocked[3] == "no"
        assert "already in use" in lines[3]
        # --json gives the health body; through a pipe the table stays, reasons uncut.
        code, text = run_on_tty("status", "--json", "--url", node.url)
        assert code == 0 and json.loads(text)["ready_instances"] == 1
        piped = run_cli("status", "--url", node.url)
        assert piped.returncode == 0 and piped.stdout.startswith("node: degraded")
        assert "stop that process or change COMFYUI_PORT_START" in piped.stdout
    finally:
        squatter.close()
