"""The authenticating proxy's plan, supervisord program and Caddy configuration: pure, tested
without processes (tests/integration/test_proxy.py runs the real Caddy)."""

from __future__ import annotations

import base64
import configparser
import json
import os
import random
import re
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from config.errors import ConfigError
from config.settings import load_settings
from services.backoff import BackoffPolicy
from services.gpu.interface import Gpu
from services.plan import NodePlan, make_plan
from services.proxy.caddy_config import (
    COOKIE_NAME,
    basic_pattern,
    bearer_pattern,
    caddy_config,
    cookie_pattern,
    query_pattern,
    render_caddy_config,
)
from services.proxy.control import ProxyControl
from services.state import MachineState, ProxyState
from services.supervisor.conf import render_conf
from services.supervisor.rpc import ProcessInfo
from services.supervisor.states import ProcessState
from tests.support import free_port_range
from tests.unit.test_checks import behind_proxy, instance, make_ready, node
from tests.unit.test_metrics import find, scrape, value

TOKEN = "Tok3n-with.all_the~chars-0123456789"
GPUS = [Gpu(i, f"GPU-{i}aaa", "NVIDIA H100", 80 << 30, f"0000:0{i}:00.0") for i in range(4)]
PROXY = {"COMFYUI_EXPOSE": "proxy", "COMFYUI_ACCESS_TOKEN": TOKEN}


def plan_for(env: dict[str, str], gpus: list[Gpu] = GPUS) -> NodePlan:
    return make_plan(
        load_settings({"MACHINE_WORKSPACE": "/ws", **env}), gpus, "/agent/python", "/usr/bin/caddy"
    )


def test_instances_listen_on_loopback_at_internal_ports_behind_public_ones() -> None:
    # COMFYUI_LISTEN (the image sets 0.0.0.0) does not open the instances behind the proxy.
    plan = plan_for({**PROXY, "NUM_GPUS": "2", "COMFYUI_LISTEN": "0.0.0.0"})
    _, second = plan.instances
    assert (second.listen, second.port, second.public_port) == ("127.0.0.1", 18189, 8189)
    argv = list(second.argv)
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "18189"
    assert second.url == "http://127.0.0.1:18189"
    assert second.public_url == "http://127.0.0.1:8189"  # 0.0.0.0 is reached through loopback
    proxy = plan.proxy
    assert proxy is not None and proxy.listen == "0.0.0.0" and proxy.ports == (8188, 8189)
    assert [r.upstream for r in proxy.routes] == ["127.0.0.1:18188", "127.0.0.1:18189"]
    assert proxy.argv == ("/usr/bin/caddy", "run", "--config", "/ws/run/caddy.json")
    assert proxy.env["XDG_CONFIG_HOME"].startswith("/ws/run/caddy")


def test_gpu_indices_pick_internal_and_public_ports() -> None:
    plan = plan_for({**PROXY, "COMFYUI_GPUS": "1,3", "COMFYUI_INTERNAL_PORT_START": "20000",
                     "COMFYUI_PUBLIC_LISTEN": "10.0.0.5"})
    assert [(i.port, i.public_port) for i in plan.instances] == [(20001, 8189), (20003, 8191)]
    assert plan.instances[0].public_url == "http://10.0.0.5:8189"


def test_tls_makes_public_urls_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    plan = plan_for({**PROXY, "NUM_GPUS": "1", "COMFYUI_TLS_CERT": str(cert),
                     "COMFYUI_TLS_KEY": str(key), "COMFYUI_PUBLIC_LISTEN": "::"})
    assert plan.instances[0].public_url == "https://127.0.0.1:8188"
    assert plan.proxy is not None and plan.proxy.scheme == "https"


def test_no_proxy_by_default() -> None:
    plan = plan_for({"NUM_GPUS": "1"})
    assert plan.proxy is None
    inst = plan.instances[0]
    assert (inst.port, inst.public_port, inst.public_url) == (8188, None, None)
    assert "comfyui-proxy" not in render_conf(plan)


def test_internal_ports_must_fit_and_stay_apart() -> None:
    with pytest.raises(ConfigError, match="COMFYUI_INTERNAL_PORT_START=65534: 4 instances"):
        plan_for({**PROXY, "COMFYUI_INTERNAL_PORT_START": "65534"})
    with pytest.raises(ConfigError, match="overlap the public ports 8188-8191"):
        plan_for({**PROXY, "COMFYUI_INTERNAL_PORT_START": "8190"})


def test_proxy_program_never_carries_the_token() -> None:
    plan = plan_for({**PROXY, "NUM_GPUS": "2"})
    text = render_conf(plan)
    assert TOKEN not in text
    conf = configparser.RawConfigParser()
    conf.read_string(text)
    program = conf["program:comfyui-proxy"]
    assert program["command"] == "/usr/bin/caddy run --config /ws/run/caddy.json"
    assert program["autostart"] == "false" and program["autorestart"] == "true"
    assert program["stdout_logfile"] == "/ws/logs/comfyui-proxy.log"
    # Not in the instances' group: its own program, stopped after them.
    assert conf["group:comfyui"]["programs"] == "comfyui-gpu0,comfyui-gpu1"
    assert int(program["priority"]) < 999
    # The agent's environment reaches supervisord without the token.
    assert "COMFYUI_ACCESS_TOKEN" in plan.withheld_env


def test_basic_pattern_accepts_any_user_with_the_token_as_password() -> None:
    pattern = re.compile(basic_pattern(TOKEN))
    rng = random.Random(7)
    for length in range(12):  # every alignment of the token in base64's 3-byte groups
        for _ in range(30):
            user = bytes(rng.randrange(256) for _ in range(length)).replace(b":", b"x")
            good = base64.b64encode(user + b":" + TOKEN.encode()).decode()
            assert pattern.fullmatch("Basic " + good), user
            assert pattern.fullmatch("basic " + good)
            for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN[:-1] + "Q", "x" + TOKEN):
                bad = base64.b64encode(user + b":" + wrong.encode()).decode()
                assert not pattern.fullmatch("Basic " + bad), (user, wrong)
            no_colon = base64.b64encode(user + b";" + TOKEN.encode()).decode()
            assert not pattern.fullmatch("Basic " + no_colon)
    assert not pattern.fullmatch("Bearer " + TOKEN)


def test_bearer_cookie_and_query_patterns_take_the_whole_token_only() -> None:
    bearer = re.compile(bearer_pattern(TOKEN))
    assert bearer.fullmatch(f"Bearer {TOKEN}") and bearer.fullmatch(f"bearer {TOKEN}")
    assert not bearer.search(f"Bearer {TOKEN}x") and not bearer.search(f"Bearer x{TOKEN}")
    # '.' is literal, not any character.
    assert not bearer.search("Bearer " + TOKEN.replace(".", "X"))
    cookie = re.compile(cookie_pattern(TOKEN))
    assert cookie.search(f"{COOKIE_NAME}={TOKEN}")
    assert cookie.search(f"a=1; {COOKIE_NAME}={TOKEN}; b=2")
    assert not cookie.search(f"x{COOKIE_NAME}={TOKEN}")
    assert not cookie.search(f"{COOKIE_NAME}={TOKEN}x")
    query = re.compile(query_pattern(TOKEN))
    assert query.search(f"a=1&token={TOKEN}") and query.search(f"token={TOKEN}&b=2")
    assert not query.search(f"xtoken={TOKEN}") and not query.search(f"token={TOKEN}1")


def test_a_token_that_would_need_escaping_is_refused() -> None:
    with pytest.raises(ValueError, match="characters"):
        bearer_pattern('abc"}{def' * 4)


def _server(config: dict, name: str = "gpu0") -> dict:
    return config["apps"]["http"]["servers"][name]


def test_config_no_admin_no_autosave_no_acme_and_one_server_per_port() -> None:
    plan = plan_for({**PROXY, "NUM_GPUS": "2", "COMFYUI_PUBLIC_LISTEN": "::1"})
    assert plan.proxy is not None
    config = caddy_config(plan.proxy, TOKEN)
    assert config["admin"] == {"disabled": True, "config": {"persist": False}}
    assert "tls" not in config["apps"]
    servers = config["apps"]["http"]["servers"]
    assert list(servers) == ["gpu0", "gpu1"]
    server = servers["gpu1"]
    assert server["listen"] == ["[::1]:8189"]
    assert server["automatic_https"] == {"disable": True}
    assert server["protocols"] == ["h1", "h2"]
    assert "tls_connection_policies" not in server
    login, proxied, refused = server["routes"]
    upstream = proxied["handle"][0]
    assert upstream["upstreams"] == [{"dial": "127.0.0.1:18189"}]
    assert upstream["flush_interval"] == -1
    assert upstream["headers"]["request"]["delete"] == ["Authorization"]
    assert len(proxied["match"]) == 3  # bearer, basic, cookie: any one lets the request in
    # ... unless the query holds some other token= (the right one was handled by `login`).
    assert all("not" in matcher_set for matcher_set in proxied["match"])
    assert "match" not in refused  # everything else
    assert refused["handle"][0]["status_code"] == 401
    assert "Basic" in refused["handle"][0]["headers"]["WWW-Authenticate"][0]
    assert TOKEN not in refused["handle"][0]["body"]
    cookie = login["handle"][0]["response"]["set"]["Set-Cookie"][0]
    assert "HttpOnly" in cookie and "Secure" not in cookie
    assert json.loads(render_caddy_config(plan.proxy, TOKEN)) == config


def test_config_with_tls_loads_the_files_and_secures_the_cookie(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    plan = plan_for({**PROXY, "NUM_GPUS": "1", "COMFYUI_TLS_CERT": str(cert),
                     "COMFYUI_TLS_KEY": str(key)})
    assert plan.proxy is not None
    config = caddy_config(plan.proxy, TOKEN)
    (loaded,) = config["apps"]["tls"]["certificates"]["load_files"]
    assert (loaded["certificate"], loaded["key"]) == (str(cert), str(key))
    server = _server(config)
    (policy,) = server["tls_connection_policies"]
    assert policy["certificate_selection"]["any_tag"] == loaded["tags"]
    assert server["automatic_https"] == {"disable": True}
    cookie = server["routes"][0]["handle"][0]["response"]["set"]["Set-Cookie"][0]
    assert cookie.endswith("; Secure")


def test_metrics_count_the_proxy_only_where_there_is_one() -> None:
    _, samples = scrape(node(make_ready(instance(0))))
    assert find(samples, "comfy_machine_proxy_up") == []
    state, proxy = behind_proxy(make_ready(instance(0)))
    proxy.restarts, proxy.started_at = 2, 1234.0
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_proxy_up") == 1
    assert value(samples, "comfy_machine_proxy_restarts_total") == 2
    assert value(samples, "comfy_machine_proxy_start_time_seconds") == 1234.0
    assert value(samples, "comfy_machine_instance_ready", gpu="0") == 1
    proxy.pid_exited = True
    _, samples = scrape(state)
    assert value(samples, "comfy_machine_proxy_up") == 0
    assert value(samples, "comfy_machine_instance_ready", gpu="0") == 0


class FakeRpc:
    """supervisord's XML-RPC as ProxyControl uses it: records starts, answers a state."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.info_state = ProcessState.STARTING

    async def start(self, name: str) -> None:
        self.started.append(name)

    async def process(self, name: str) -> ProcessInfo:
        return ProcessInfo(name.split(":")[0], self.info_state, 0, 0, 0, "", "")

    async def tail_log(self, name: str) -> str:
        return "Error: loading certificates: no such file\n"


def _control(public_port: int) -> tuple[ProxyControl, ProxyState, FakeRpc, list[str]]:
    plan = plan_for({**PROXY, "NUM_GPUS": "1", "COMFYUI_PORT_START": str(public_port),
                     "COMFYUI_PUBLIC_LISTEN": "127.0.0.1"})
    assert plan.proxy is not None
    state = MachineState()
    proxy = state.proxy = ProxyState(plan=plan.proxy)
    rpc, spawned = FakeRpc(), []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        spawned.append(name)
        coro.close()

    control = ProxyControl(state, proxy, rpc, spawn, BackoffPolicy(initial_s=30, max_s=600))
    return control, proxy, rpc, spawned


async def test_control_starts_the_proxy_once_its_ports_are_free() -> None:
    port = free_port_range(1)
    control, proxy, rpc, _ = _control(port)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        await control.reconcile(1000.0)
        assert rpc.started == [] and proxy.blocked_reason is not None
        assert f"public port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in (
            proxy.blocked_reason)
    await control.reconcile(1001.0)
    assert rpc.started == ["comfyui-proxy:comfyui-proxy"] and proxy.blocked_reason is None
    # Started: the next pass, before supervisord's event, does not start it again.
    assert proxy.process_state is ProcessState.STARTING
    await control.reconcile(1002.0)
    assert rpc.started == ["comfyui-proxy:comfyui-proxy"]


async def test_control_starts_a_fatal_proxy_again_after_a_doubling_backoff() -> None:
    control, proxy, rpc, _ = _control(free_port_range(1))
    proxy.process_state = ProcessState.BACKOFF
    control.on_event(ProcessState.FATAL, ProcessState.BACKOFF, None)
    assert proxy.attempt == 1 and proxy.next_start_at is not None
    due = proxy.next_start_at
    assert control.next_due(due - 30) == pytest.approx(30)
    await control.reconcile(due - 1)
    assert rpc.started == []
    await control.reconcile(due + 0.1)
    assert rpc.started == ["comfyui-proxy:comfyui-proxy"]
    assert proxy.next_start_at is None and proxy.restarts == 1
    # It fails again: the wait doubles; the last log lines come with the refresh.
    control.on_event(ProcessState.FATAL, ProcessState.BACKOFF, None)
    assert proxy.attempt == 2 and proxy.next_start_at is not None
    rpc.info_state = ProcessState.FATAL
    await control.refresh()
    assert proxy.log_tail == ["Error: loading certificates: no such file"]
    assert proxy.attempt == 2  # the refresh saw the FATAL already counted
