"""The CLI's health client (the standard library's http.client, no aiohttp) over real HTTP: the
product's health server for wait-ready's long poll, small aiohttp apps for the edge cases, and
the CLI commands as processes that never import aiohttp, pydantic or prometheus_client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.errors import HealthClientError
from health.metrics import build_registry
from health.server import create_app
from machine import cli
from machine.health_client import Outcome, get_health, post_health, request, wait_ready
from services.state import Phase
from services.supervisor.states import ProcessState
from tests.support import free_port_range
from tests.unit.test_checks import instance, make_ready, node
from tests.unit.test_metrics import rich_state

TOKEN = "client-test-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]


def base_of(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_wait_ready_shows_each_change_then_ready(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    inst = instance(0)
    state = node(inst, phase=Phase.STARTING)
    client = await aiohttp_client(create_app(state))
    loop = asyncio.get_running_loop()

    def starting() -> None:
        inst.process_state, inst.pid = ProcessState.STARTING, 7
        state.changed()

    def ready() -> None:
        make_ready(inst)
        state.set_phase(Phase.RUNNING)

    loop.call_later(0.3, starting)
    loop.call_later(0.8, ready)
    seen: list[dict[str, Any]] = []
    started = time.monotonic()
    # The client blocks (http.client): it runs off the loop that serves it.
    outcome, body = await asyncio.to_thread(
        wait_ready, base_of(client), "/health/comfyui/instances/0", 30, seen.append
    )
    assert outcome is Outcome.READY and body["status"] == "ready"
    # The first answer at once, then one per change: woken by the changes, not by polling.
    assert [b["state"] for b in seen] == ["STOPPED", "STARTING"]
    assert 0.7 < time.monotonic() - started < 5


async def test_wait_ready_final_refused_and_timeout(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    state = node(instance(0), phase=Phase.STARTING)
    client = await aiohttp_client(create_app(state))
    base = base_of(client)
    started = time.monotonic()
    outcome, body = await asyncio.to_thread(wait_ready, base, "/health/comfyui", 0.5)
    assert outcome is Outcome.TIMEOUT and body["reasons"]
    assert 0.4 < time.monotonic() - started < 3
    outcome, body = await asyncio.to_thread(wait_ready, base, "/health/comfyui/instances/5", 5)
    assert outcome is Outcome.REFUSED and "no instance for gpu 5" in body["error"]
    state.set_phase(Phase.FAILED, "install failed", "installing")
    started = time.monotonic()
    outcome, body = await asyncio.to_thread(wait_ready, base, "/health/comfyui", 30)
    assert outcome is Outcome.FINAL and "install failed" in body["final_reason"]
    assert time.monotonic() - started < 2


def test_wait_ready_retries_until_the_deadline_when_nothing_listens() -> None:
    base = f"http://127.0.0.1:{free_port_range(1)}"
    started = time.monotonic()
    outcome, body = wait_ready(base, "/health/comfyui", 0.6)
    assert outcome is Outcome.TIMEOUT and 0.5 < time.monotonic() - started < 3
    assert f"no answer from the health server at {base}" in body["reasons"][0]


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "method": request.method,
            "path": request.path,
            "query": sorted(request.query.items()),
            "authorization": request.headers.get("Authorization"),
        }, status=int(request.query.get("status", "200")))

    async def slow(request: web.Request) -> web.Response:
        await asyncio.Event().wait()  # never answers (cancelled when the client gives up)
        return web.json_response({})

    async def dribble(request: web.Request) -> web.StreamResponse:
        # Each byte comes well within a socket timeout: only a deadline on the whole answer
        # ends this.
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b" ")
            await asyncio.sleep(0.05)
        return resp

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>not the health server</html>", content_type="text/html")

    async def listing(request: web.Request) -> web.Response:
        return web.json_response([1, 2])

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/slow", slow)
    app.router.add_get("/dribble", dribble)
    app.router.add_get("/html", html)
    app.router.add_get("/list", listing)
    return app


async def test_get_and_post_send_query_and_token(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    base = base_of(await aiohttp_client(echo_app()))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    code, body = await asyncio.to_thread(
        get_health, base, "/echo?tail=3", 0.5, auth, "tok en&x"
    )
    assert code == 200 and body["method"] == "GET" and body["authorization"] == f"Bearer {TOKEN}"
    # A query in the path stays; ?wait= and ?since= (escaped) come after it.
    assert body["query"] == [["since", "tok en&x"], ["tail", "3"], ["wait", "0.500"]]
    code, body = await asyncio.to_thread(post_health, base + "/", "/echo?status=409", auth)
    assert code == 409 and body["method"] == "POST" and body["path"] == "/echo"
    code, body = await asyncio.to_thread(get_health, base, "/echo")
    assert body["query"] == [] and body["authorization"] is None


async def test_errors_name_the_url_and_what_to_do_never_the_token(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    base = base_of(await aiohttp_client(echo_app()))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def error_of(*args: Any, **kwargs: Any) -> str:
        with pytest.raises(HealthClientError) as info:
            await asyncio.to_thread(*args, **kwargs)
        message = str(info.value)
        assert TOKEN not in message
        return message

    started = time.monotonic()
    message = await error_of(request, "GET", base, "/slow", headers=auth, limit_s=0.3)
    assert time.monotonic() - started < 2
    assert f"no answer from the health server at {base}" in message
    assert "no whole answer within 0.3s" in message and "MACHINE_HEALTH_PORT" in message
    started = time.monotonic()
    message = await error_of(request, "GET", base, "/dribble", headers=auth, limit_s=0.5)
    assert time.monotonic() - started < 2 and "within 0.5s" in message
    for path in ("/html", "/list"):
        message = await error_of(get_health, base, path, headers=auth)
        assert f"{base} answered {path} with HTTP 200 and no JSON object" in message
    message = await error_of(request, "GET", "ftp://127.0.0.1:21", "/")
    assert "not an http:// or https:// URL" in message
    # Credentials in a --url are not repeated either.
    closed = f"http://user:{TOKEN}@127.0.0.1:{free_port_range(1)}"
    message = await error_of(get_health, closed, "/health/comfyui")
    assert "ConnectionRefusedError" in message and "http://***@127.0.0.1" in message


def test_gpu_facts_reads_what_prometheus_client_reads() -> None:
    text = generate_latest(build_registry(rich_state())).decode()
    wanted = cli.GPU_FACTS
    expected: dict[str, list[float | None]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                pair = expected.setdefault(sample.labels["UUID"], [None, None])
                pair[wanted[sample.name]] = sample.value
    assert expected and cli.gpu_facts(text) == {k: tuple(v) for k, v in expected.items()}
    # Escaped label values (\\ \" \n, a "} " inside one), a timestamp, NaN, other families.
    odd = "\n".join([
        "# HELP comfy_machine_gpu_temperature_celsius GPU core temperature",
        "# TYPE comfy_machine_gpu_temperature_celsius gauge",
        'comfy_machine_gpu_temperature_celsius{gpu="0",UUID="GPU-a",modelName="x\\"} 1 \\\\n"} '
        "71.5 1700000000000",
        'comfy_machine_gpu_temperature_celsius_other{UUID="GPU-a"} 1',
        'comfy_machine_gpu_framebuffer_used_bytes{UUID="GPU-b\\n"} NaN',
        'comfy_machine_gpu_framebuffer_used_bytes{UUID="GPU-a"} 1024',
        "comfy_machine_gpu_framebuffer_used_bytes 5",
        "",
    ])
    facts = cli.gpu_facts(odd)
    assert facts["GPU-a"] == (71.5, 1024.0)
    temp, used = facts["GPU-b\n"]
    assert temp is None and used != used  # NaN
    assert set(facts) == {"GPU-a", "GPU-b\n"}


def test_log_auth_reads_settings_only_when_they_can_hold_a_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [n for n in os.environ if n.upper() in ("MACHINE_HEALTH_TOKEN", "MACHINE_CONFIG")]:
        monkeypatch.delenv(name)
    load_settings = cli.load_settings
    args = argparse.Namespace(log_level="INFO")
    monkeypatch.setattr(cli, "setup_logging", lambda level: None)  # pytest's handlers stay

    def not_loaded(**overrides: Any) -> Any:
        raise AssertionError("Settings loaded")

    monkeypatch.setattr(cli, "load_settings", not_loaded)
    assert cli._log_auth(args) == {}
    monkeypatch.setenv("MACHINE_HEALTH_TOKEN", TOKEN)
    assert cli._log_auth(args) == {"Authorization": f"Bearer {TOKEN}"}
    monkeypatch.delenv("MACHINE_HEALTH_TOKEN")
    # A token only the MACHINE_CONFIG file has: Settings are loaded for it.
    monkeypatch.setattr(cli, "load_settings", load_settings)
    config = tmp_path / "machine.toml"
    config.write_text(f'machine_health_token = "{TOKEN}"\n')
    monkeypatch.setenv("MACHINE_CONFIG", str(config))
    assert cli._log_auth(args) == {"Authorization": f"Bearer {TOKEN}"}


# Run a command in a fresh interpreter and report what it imported.
PROBE = """
import contextlib, io, json, sys
from machine.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
heavy = {"aiohttp", "asyncio", "pydantic", "pydantic_settings", "prometheus_client", "yaml",
         "logging"}
loaded = sorted(heavy & {name.split(".")[0] for name in sys.modules})
print(json.dumps({"code": code, "loaded": loaded, "out": out.getvalue(), "err": err.getvalue()}))
"""


async def probe(env: dict[str, str], *args: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MACHINE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, *args, cwd=ROOT, env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_status_and_wait_ready_load_neither_aiohttp_nor_pydantic(
    aiohttp_server, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    server = await aiohttp_server(create_app(rich_state()), host="127.0.0.1")
    env = {"MACHINE_HEALTH_PORT": str(server.port), "MACHINE_HEALTH_LISTEN": "127.0.0.1"}
    status = await probe(env, "status")
    assert status["code"] == 0 and status["loaded"] == [], status
    assert status["out"].startswith("node: ready") and "60C" in status["out"]
    as_json = await probe(env, "status", "--json")
    assert json.loads(as_json["out"])["ready_instances"] == 2 and as_json["loaded"] == []
    for args in (["wait-ready"], ["wait-ready", "--gpu", "1", "--timeout", "5"]):
        waited = await probe(env, *args)
        assert waited["code"] == 0 and waited["loaded"] == [], waited
    assert waited["out"].strip() == "gpu 1 ready: http://127.0.0.1:8189"
    url = await probe({}, "wait-ready", "--url", f"http://127.0.0.1:{server.port}")
    assert url["code"] == 0 and url["loaded"] == []
    # A MACHINE_CONFIG file: read by Settings, and the node is still found.
    config = tmp_path / "machine.toml"
    config.write_text(f'machine_health_port = {server.port}\nmachine_health_listen = "::"\n')
    from_file = await probe({"MACHINE_CONFIG": str(config)}, "status")
    assert from_file["code"] == 0 and from_file["out"].startswith("node: ready")
    # A port only Settings reads ("0" + port) is read by Settings; one it refuses exits 2.
    padded = await probe({"MACHINE_HEALTH_PORT": f"0{server.port}"}, "wait-ready")
    assert padded["code"] == 0 and "pydantic" in padded["loaded"]
    bad = await probe({"MACHINE_HEALTH_PORT": "abc"}, "status")
    assert bad["code"] == 2 and "MACHINE_HEALTH_PORT='abc'" in bad["err"]
