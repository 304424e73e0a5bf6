"""Issue 17, point 4: instance logs are not public. The log route answers only with
`Authorization: Bearer <MACHINE_HEALTH_TOKEN>` (401 without or with a wrong one, 403 with a
hint when no token is set), never reads through a symlink or from a FIFO, and stays bounded;
every other route stays open. The token is a secret: never shown in errors or reprs."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from config.errors import ConfigError
from config.settings import load_settings
from health.server import create_app
from services.state import InstanceState
from tests.unit.test_checks import instance, make_ready, node

TOKEN = "s3cret-log-token-0123456789abcdef"
LOG = "/health/comfyui/instances/0/log"


async def client_for(aiohttp_client, log: Path, token: str | None) -> TestClient:  # type: ignore[no-untyped-def]
    inst = make_ready(instance(0))
    state = node(InstanceState(plan=replace(inst.plan, log_path=log)))
    return await aiohttp_client(create_app(state, log_token=token))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_no_token_configured_means_no_logs(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "gpu0.log").write_text("prompt: a secret prompt\n")
    client = await client_for(aiohttp_client, tmp_path / "gpu0.log", token=None)
    for headers in ({}, bearer(TOKEN), bearer("")):
        resp = await client.get(LOG, headers=headers)
        body = await resp.json()
        assert resp.status == 403 and "MACHINE_HEALTH_TOKEN" in body["error"]
        assert "secret prompt" not in await resp.text()


async def test_logs_need_the_bearer_token(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "gpu0.log").write_text("line 1\nline 2\n")
    client = await client_for(aiohttp_client, tmp_path / "gpu0.log", token=TOKEN)
    wrong = [
        {},
        bearer("wrong-token-wrong-token-wrong-tok"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer caf\u00e9"},
        {"X-Token": TOKEN},
    ]
    for headers in wrong:
        for path in (LOG, LOG + "?after=0", "/health/comfyui/instances/7/log"):
            resp = await client.get(path, headers=headers)
            body = await resp.json()
            assert resp.status == 401, (headers, path)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in body["error"] and "line 1" not in await resp.text()
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {TOKEN}"}
        resp = await client.get(LOG, params={"tail": "5"}, headers=headers)
        assert resp.status == 200 and (await resp.json())["lines"] == ["line 1", "line 2"]
    resp = await client.get(LOG, params={"tail": "1001"}, headers=bearer(TOKEN))
    assert resp.status == 400  # bounded: at most 1000 lines per answer


async def test_every_other_route_stays_open(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = await client_for(aiohttp_client, tmp_path / "gpu0.log", token=TOKEN)
    for path in ("/health/comfyui", "/health/comfyui/instances", "/health/comfyui/instances/0",
                 "/health/comfyui/installation", "/health/comfyui/models", "/livez", "/readyz",
                 "/metrics"):
        resp = await client.get(path)
        assert resp.status in (200, 503), path
        assert resp.status != 401 and "WWW-Authenticate" not in resp.headers


async def test_a_symlink_at_the_log_path_is_refused(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "agent-secrets.env"
    secret.write_text("API_KEY=do-not-leak\n")
    log = tmp_path / "gpu0.log"
    log.symlink_to(secret)
    client = await client_for(aiohttp_client, log, token=TOKEN)
    inode = str(secret.stat().st_ino)
    for params in ({"tail": "10"}, {"after": "0"}, {"after": "0", "inode": inode}):
        resp = await client.get(LOG, params=params, headers=bearer(TOKEN))
        text = await resp.text()
        assert resp.status == 403 and "do-not-leak" not in text, params
        assert "symbolic link" in (await resp.json())["error"]
    # A symlinked rotated file is left out of a tail, never followed.
    log.unlink()
    log.write_text("current\n")
    (tmp_path / "gpu0.log.1").symlink_to(secret)
    resp = await client.get(LOG, params={"tail": "10"}, headers=bearer(TOKEN))
    assert resp.status == 200 and (await resp.json())["lines"] == ["current"]


async def test_a_fifo_at_the_log_path_does_not_hang(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "gpu0.log"
    os.mkfifo(log)
    client = await client_for(aiohttp_client, log, token=TOKEN)
    started = time.monotonic()
    resp = await client.get(LOG, headers=bearer(TOKEN))
    assert resp.status == 403 and "not a regular file" in (await resp.json())["error"]
    assert time.monotonic() - started < 2


def test_the_token_is_a_secret_setting() -> None:
    settings = load_settings({"MACHINE_HEALTH_TOKEN": TOKEN})
    assert settings.machine_health_token is not None
    assert settings.machine_health_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    assert load_settings({}).machine_health_token is None
    for bad, says in (("short-token", "too short"), ("has a space in it 0123", "spaces")):
        with pytest.raises(ConfigError) as err:
            load_settings({"MACHINE_HEALTH_TOKEN": bad})
        text = str(err.value)
        assert text.startswith("MACHINE_HEALTH_TOKEN='***': ") and says in text
        assert bad not in text


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"MACHINE_HEALTH_IDLE_TIMEOUT": "0"}, "MACHINE_HEALTH_IDLE_TIMEOUT='0': Input should be "
         "greater than 0; expected seconds an idle keep-alive connection"),
        ({"MACHINE_HEALTH_IDLE_TIMEOUT": "soon"}, "MACHINE_HEALTH_IDLE_TIMEOUT='soon'"),
        ({"MACHINE_HEALTH_MAX_CONNECTIONS": "5"}, "MACHINE_HEALTH_MAX_CONNECTIONS='5': Input "
         "should be greater than or equal to 10; expected open connections"),
        ({"MACHINE_HEALTH_MAX_CONNECTIONS": "lots"}, "MACHINE_HEALTH_MAX_CONNECTIONS='lots'"),
    ],
)
def test_the_limit_settings_are_validated(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert says in str(err.value)


def test_the_limit_settings_defaults() -> None:
    settings = load_settings({})
    assert settings.machine_health_idle_timeout == 30.0
    assert settings.machine_health_max_connections == 10_000
    settings = load_settings({"MACHINE_HEALTH_IDLE_TIMEOUT": "2.5",
                              "MACHINE_HEALTH_MAX_CONNECTIONS": "50"})
    assert settings.machine_health_idle_timeout == 2.5
    assert settings.machine_health_max_connections == 50
