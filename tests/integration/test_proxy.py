"""COMFYUI_EXPOSE=proxy end to end: a real node, the stand-in behind a real Caddy.

The instances listen on 127.0.0.1; Caddy serves their public ports on 127.0.0.2 (another
loopback address, standing for the machine's public one), so what is and is not reachable
there is what a client elsewhere would find."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support import Node, free_port_range, short_tmpdir, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("caddy") is None,
    reason="Caddy is not installed: apt-get install caddy (Debian/Ubuntu package; .ci/run "
    "installs it)",
)

PUBLIC = "127.0.0.2"
TOKEN = secrets.token_hex(16)  # 32 characters, new for each run
# Wrong tokens, each sent once in one form; none may show up in any log afterwards.
WRONG = {form: f"wrong-{form}-{secrets.token_hex(12)}"
         for form in ("bearer", "basic", "cookie", "query", "query-beside-bearer")}


def proxied(workspace_root: Path, repo: tuple[str, str], gpus: int, **env: str) -> Node:
    url, commit = repo
    node = Node(workspace_root / "ws", {
        "COMFYUI_REPO": url,
        "COMFYUI_REF": commit,
        "COMFYUI_EXPOSE": "proxy",
        "COMFYUI_ACCESS_TOKEN": TOKEN,
        "COMFYUI_PUBLIC_LISTEN": PUBLIC,
        "COMFYUI_INTERNAL_PORT_START": str(free_port_range(gpus)),
        **env,
    }, gpus)
    # The public ports must be free on the public address too.
    node.env["COMFYUI_PORT_START"] = str(node.port_start)
    return node


@pytest.fixture(scope="module")
def node(standin_repo: tuple[str, str]) -> Iterator[Node]:
    """Two instances behind the proxy, ready (shared by the tests that only read)."""
    root = short_tmpdir()
    node = proxied(root, standin_repo, 2).start()
    try:
        node.wait_ready()
        yield node
    finally:
        node.kill_everything()
        shutil.rmtree(root, ignore_errors=True)


def public(node: Node, gpu: int = 0, scheme: str = "http") -> str:
    return f"{scheme}://{PUBLIC}:{node.port_start + gpu}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def ws_status(session: aiohttp.ClientSession, url: str, **kw: Any) -> dict[str, Any]:
    """Open the instance's websocket and return its first message (ComfyUI sends `status`)."""
    async with asyncio.timeout(10), session.ws_connect(url + "/ws?clientId=proxy-test", **kw) as ws:
        return await ws.receive_json()


async def test_without_the_token_nothing_of_comfyui_gets_out(node: Node) -> None:
    base = public(node)
    async with aiohttp.ClientSession() as session:
        async with session.get(node.instance(0)[1]["url"] + "/") as resp:
            page = await resp.text()  # the instance's own page, straight from 127.0.0.1
        requests = [("GET", "/", {}), ("GET", "/system_stats", {}), ("GET", "/object_info", {}),
                    ("POST", "/prompt", {"json": {"prompt": {}}}),
                    ("GET", "/view?filename=x.png&type=output", {}),
                    ("GET", "/", {"headers": {"Authorization": f"Bearer {WRONG['bearer']}"}}),
                    ("GET", "/", {"headers": {"Authorization": basic("u", WRONG["basic"])}}),
                    ("GET", "/", {"headers": {"Authorization": basic(TOKEN, "")}}),
                    ("GET", "/", {"headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}}),
                    ("GET", "/", {"headers": {"Cookie": f"comfy_machine_token={WRONG['cookie']}"}}),
                    ("GET", f"/?token={WRONG['query']}", {}),
                    ("GET", f"/?token={TOKEN}x", {}),
                    # The right header beside a wrong ?token=: refused, it goes no further.
                    ("GET", f"/system_stats?token={WRONG['query-beside-bearer']}",
                     {"headers": {"Authorization": f"Bearer {TOKEN}"}})]
        for method, path, kw in requests:
            async with session.request(method, base + path, allow_redirects=False, **kw) as resp:
                body = await resp.text()
                assert resp.status == 401, (method, path, resp.status, body)
                assert "set-cookie" not in resp.headers
                assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
                assert body.startswith("401 Unauthorized") and page not in body
                assert "system" not in body and "{" not in body
        for headers in ({}, {"Authorization": f"Bearer {WRONG['bearer']}"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await ws_status(session, base, headers=headers)
            assert info.value.status == 401


async def test_each_accepted_form_gets_in_with_a_working_websocket(node: Node) -> None:
    base = public(node, 1)
    forms: dict[str, dict[str, str]] = {
        "bearer": {"Authorization": f"Bearer {TOKEN}"},
        "bearer, any case": {"Authorization": f"bearer {TOKEN}"},
        # Every alignment of the token in base64's groups: user names of 0 to 3 bytes.
        **{f"basic, user {user!r}": {"Authorization": basic(user, TOKEN)}
           for user in ("", "a", "ab", "krita")},
        "cookie": {"Cookie": f"other=1; comfy_machine_token={TOKEN}"},
    }
    async with aiohttp.ClientSession() as session:
        for form, headers in forms.items():
            async with session.get(base + "/system_stats", headers=headers) as resp:
                assert resp.status == 200, form
                stats = await resp.json()
            assert str(node.port_start + 1) not in stats["system"]["argv"]  # its internal port
            message = await ws_status(session, base, headers=headers)
            assert message["type"] == "status", form
        # A URL with the token as password, as clients that take only a URL are given it.
        url = f"http://worker:{TOKEN}@{PUBLIC}:{node.port_start + 1}"
        async with session.get(url + "/queue") as resp:
            assert resp.status == 200
    # A browser: ?token= once sets the cookie and sends it on without the token in the URL.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(f"{base}/view?filename=x.png&token={TOKEN}&type=output",
                               allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
            cookie = resp.headers["Set-Cookie"]
        assert location.startswith(f"{base}/view?filename=x.png&") and TOKEN not in location
        assert f"comfy_machine_token={TOKEN};" in cookie
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
        async with browser.get(base + "/") as resp:
            assert resp.status == 200 and "ComfyUI" in await resp.text()
        assert (await ws_status(browser, base))["type"] == "status"


async def test_a_prompt_upload_and_view_through_the_proxy(node: Node) -> None:
    base = public(node)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    upload = os.urandom(3 * 1024 * 1024)  # bigger than any buffer on the way
    async with aiohttp.ClientSession(headers=headers) as session:
        form = aiohttp.FormData()
        form.add_field("image", io.BytesIO(upload), filename="proxy-upload.bin",
                       content_type="application/octet-stream")
        form.add_field("overwrite", "true")
        async with session.post(base + "/upload/image", data=form) as resp:
            assert resp.status == 200, await resp.text()
            name = (await resp.json())["name"]
        async with session.get(base + "/view", params={"filename": name, "type": "input"}) as resp:
            assert resp.status == 200 and await resp.read() == upload
        prompt = {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 7}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"filename_prefix": "proxy-test/out", "images": ["1", 0]}},
        }
        async with session.ws_connect(base + "/ws?clientId=proxy-prompt") as ws:
            async with session.post(base + "/prompt",
                                    json={"prompt": prompt, "client_id": "proxy-prompt"}) as resp:
                assert resp.status == 200, await resp.text()
                prompt_id = (await resp.json())["prompt_id"]
            # The execution's progress arrives over the websocket, through the proxy.
            async with asyncio.timeout(20):
                while True:
                    message = await ws.receive_json()
                    data = message.get("data", {})
                    if (message["type"] == "executing" and data.get("node") is None
                            and data.get("prompt_id") == prompt_id):
                        break
        async with session.get(f"{base}/history/{prompt_id}") as resp:
            entry = (await resp.json())[prompt_id]
        assert entry["status"]["completed"]
        (image,) = entry["outputs"]["2"]["images"]
        async with session.get(base + "/view", params=image) as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")


def test_instances_are_on_loopback_only_and_health_gives_both_urls(node: Node) -> None:
    code, body = node.get("/health/comfyui")
    assert code == 200 and body["proxy"]["serving"] and body["proxy"]["ports"] == [
        node.port_start, node.port_start + 1]
    for inst in body["instances"]:
        internal = inst["port"]
        assert inst["url"] == f"http://127.0.0.1:{internal}"
        assert inst["public_url"] == f"http://{PUBLIC}:{inst['public_port']}"
        assert inst["public_smoke"]["status"] == "passed"
        assert inst["public_smoke"]["pid"] == inst["pid"]
        # Workers on the same host use the internal URL; from the public address it is shut.
        with socket.create_connection(("127.0.0.1", internal), timeout=2):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((PUBLIC, internal), timeout=2)
    # Caddy listens on the public ports alone: no admin endpoint, no HTTP/3 (UDP).
    caddy = psutil.Process(body["proxy"]["pid"])
    assert sorted(c.laddr for c in caddy.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM) == [
        (PUBLIC, node.port_start), (PUBLIC, node.port_start + 1)]
    config = node.workspace / "run" / "caddy.json"
    assert config.stat().st_mode & 0o777 == 0o600
    assert caddy.cmdline()[-2:] == ["--config", str(config)]


def test_the_token_stays_out_of_logs_command_lines_and_instances(node: Node) -> None:
    # Runs after the tests above sent every wrong token (pytest keeps the file's order).
    for inst in node.get("/health/comfyui")[1]["instances"]:
        environ = psutil.Process(inst["pid"]).environ()
        assert "COMFYUI_ACCESS_TOKEN" not in environ
        assert not any(TOKEN in value for value in environ.values())
    for proc in node.tree():
        assert not any(TOKEN in arg for arg in proc.cmdline()), proc.cmdline()
    config = node.workspace / "run" / "caddy.json"
    secrets_seen = [TOKEN, *WRONG.values()]
    for path in [*node.workspace.rglob("*"), node.log_path]:
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        for secret in secrets_seen:
            if path == config and secret == TOKEN:
                continue  # the one place it must be (0600, checked above)
            assert secret.encode() not in data, f"{secret[:10]}... found in {path}"


def test_killing_caddy_restarts_it_and_the_instances_wait(standin_repo: tuple[str, str]) -> None:
    root = short_tmpdir()
    node = proxied(root, standin_repo, 1)
    try:
        node.start()
        body = node.wait_ready()
        proxy_pid, instance_pid = body["proxy"]["pid"], body["instances"][0]["pid"]
        os.kill(proxy_pid, signal.SIGKILL)
        code, entry = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(node.instance(0)), 2.0,
            "the instance to be not ready while Caddy is down",
        )
        # The instance itself is fine: only the way in is gone.
        assert entry["ready"] is False and entry["pid"] == instance_pid
        assert any("comfyui-proxy (Caddy" in r and "exited" in r for r in entry["reasons"]), (
            entry["reasons"])
        body = node.wait_ready(30)
        assert body["proxy"]["pid"] != proxy_pid and body["proxy"]["restarts"] == 1
        assert body["instances"][0]["pid"] == instance_pid
        code, _ = node.get("/health/comfyui/instances/0")
        assert code == 200
        text = metrics(node)
        assert "comfy_machine_proxy_restarts_total 1.0" in text
        assert "comfy_machine_proxy_up 1.0" in text
    finally:
        node.kill_everything()
        shutil.rmtree(root, ignore_errors=True)


def metrics(node: Node) -> str:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="openssl is not installed (apt-get install openssl): it makes the "
                    "test certificate")
async def test_tls_with_a_certificate_and_key(standin_repo: tuple[str, str]) -> None:
    root = short_tmpdir()
    cert, key = root / "cert.pem", root / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=comfy-machine-test", "-addext", f"subjectAltName=IP:{PUBLIC}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    node = proxied(root, standin_repo, 1, COMFYUI_TLS_CERT=str(cert), COMFYUI_TLS_KEY=str(key))
    try:
        node.start()
        body = await asyncio.to_thread(node.wait_ready)  # the smoke prompt went through HTTPS
        base = public(node, scheme="https")
        assert body["instances"][0]["public_url"] == base and body["proxy"]["tls"] is True
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
            async with session.get(base + "/system_stats") as resp:
                assert resp.status == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(base + "/system_stats", headers=headers) as resp:
                assert resp.status == 200 and "system" in await resp.json()
            assert (await ws_status(session, base, headers=headers))["type"] == "status"
            async with session.get(f"{base}/?token={TOKEN}", allow_redirects=False) as resp:
                assert resp.status == 303 and "; Secure" in resp.headers["Set-Cookie"]
        # Plain HTTP on the TLS port gets nothing of ComfyUI either.
        async with (
            aiohttp.ClientSession() as session,
            session.get(public(node) + "/system_stats", headers=headers) as resp,
        ):
            assert resp.status == 400 and "system" not in await resp.text()
    finally:
        node.kill_everything()
        shutil.rmtree(root, ignore_errors=True)
