"""Credentials never show: a URL's user:token and the tokens of auth_env reach git through its
environment only. A real node boots ComfyUI (the stand-in) and custom nodes from private
repositories on a loopback git server that checks them; afterwards no secret is in any file
of the workspace (lock, logs, supervisord.conf, .git/config), in a health body, in /metrics
or in the command line of any process that ran meanwhile."""

from __future__ import annotations

import base64
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import psutil
import pytest

from config.errors import ConfigError
from config.git_input import GitAuth, redact_urls, split_userinfo
from config.nodes import CustomNodeSpec
from config.settings import custom_node_specs, load_settings
from services.install.git import authorization
from services.install.installer import InstallInputs
from tests.gitserver import git_http_server
from tests.integration.test_installer import make_repo
from tests.support import Node, wait_until

COMFY_SECRET = "cmSecretComfy3141"
NODE_TOKEN = "cmNodeToken2718"
PASS_TOKEN = "cmPassToken1618"
WRONG_SECRET = "cmWrongSecret1414"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def forms(secret: str, user: str = "user") -> list[str]:
    """A secret as it could leak: as is, and inside a Basic header."""
    return [secret, basic(user, secret).removeprefix("Basic ")]


SECRETS = [
    *forms(COMFY_SECRET),
    *forms(WRONG_SECRET),
    NODE_TOKEN,
    PASS_TOKEN,
]


# -- the pieces ---------------------------------------------------------------------------------


def test_userinfo_is_split_off_and_redacted() -> None:
    assert split_userinfo(f"https://user:{COMFY_SECRET}@h:8443/o/r.git") == (
        "https://h:8443/o/r.git",
        f"user:{COMFY_SECRET}",
    )
    assert split_userinfo("git@github.com:o/r.git") == ("git@github.com:o/r.git", None)
    assert split_userinfo("ssh://git:pw@h/o/r") == ("ssh://git@h/o/r", None)
    text = f"fatal: unable to access 'https://u:{COMFY_SECRET}@h/o/': 401"
    assert COMFY_SECRET not in redact_urls(text) and "https://***@h/o/" in redact_urls(text)


def test_authorization_header_from_userinfo_or_auth_env() -> None:
    assert authorization(GitAuth(userinfo="u:p%40ss")) == basic("u", "p@ss")
    env = {"TOKEN": NODE_TOKEN}
    assert authorization(GitAuth(token_env="TOKEN"), env) == f"Bearer {NODE_TOKEN}"
    # A user name in the URL makes it Basic user:token (what GitHub and GitLab accept).
    assert authorization(GitAuth("x-access-token", "TOKEN"), env) == basic(
        "x-access-token", NODE_TOKEN
    )
    assert authorization(GitAuth(token_env="UNSET"), env) is None
    assert COMFY_SECRET not in repr(GitAuth(userinfo=f"u:{COMFY_SECRET}"))


def test_install_inputs_keep_urls_without_credentials(tmp_path: Path) -> None:
    """Whoever builds the inputs: the URLs the lock, health and logs get have no userinfo."""
    spec = CustomNodeSpec("n", f"https://u:{WRONG_SECRET}@h/o/n.git", "HEAD", False, True, "t")
    inputs = InstallInputs(
        comfyui_url=f"https://u:{COMFY_SECRET}@h/o/c.git", comfyui_ref="v1",
        install_path=tmp_path, nodes=(spec,), python=tmp_path, venv=None, base_python="",
        protected=(), on_conflict="fail", install_py_timeout=1, workers=1, workspace=tmp_path,
        min_free_bytes=0,
    )
    assert inputs.comfyui_url == "https://h/o/c.git" and inputs.nodes[0].url == "https://h/o/n.git"
    assert authorization(inputs.comfyui_auth) == basic("u", COMFY_SECRET)
    assert authorization(inputs.node_auth["n"]) == basic("u", WRONG_SECRET)
    assert all(s not in repr(inputs) + inputs.digest() for s in SECRETS)


def test_settings_errors_never_show_credentials(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text(
        f'[[custom_nodes]]\nurl = "https://u:{WRONG_SECRET}@h/o/r x"\n'
        '[[custom_nodes]]\nurl = "https://h/o/p"\nauth_env = "1BAD"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_REPO": f"https://u:{COMFY_SECRET}@h/o/r x"})
    with pytest.raises(ConfigError) as nodes:
        custom_node_specs(load_settings({"MACHINE_CONFIG": str(conf)}))
    message = f"{info.value}\n{nodes.value}"
    assert "COMFYUI_REPO='https://***@h/o/r x'" in message, message
    assert "custom_nodes[0]=https://***@h/o/r x" in message and "auth_env" in message, message
    assert COMFY_SECRET not in message and WRONG_SECRET not in message


# -- a real node --------------------------------------------------------------------------------


class ArgvWatch:
    """Every command line of every process seen while it runs (polled)."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or ())
                if cmdline:
                    self.seen[proc.info["pid"]] = cmdline
            self._stop.wait(0.01)

    def __enter__(self) -> ArgvWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


NODE_INIT = "NODE_CLASS_MAPPINGS = {}\n"
# The node's own code reports whether it was handed the tokens.
INSTALL_PY = (
    "import os\n"
    "print('NODE_TOKEN seen:', 'NODE_TOKEN' in os.environ)\n"
    "print('COMFYUI_REPO seen:', 'COMFYUI_REPO' in os.environ)\n"
)


@pytest.fixture
def private_server(tmp_path: Path, standin_repo: tuple[str, str]) -> Iterator[dict[str, str]]:
    """The stand-in and two nodes behind credentials; URLs by name (without credentials)."""
    accepted = {basic("user", COMFY_SECRET), f"Bearer {NODE_TOKEN}", f"Bearer {PASS_TOKEN}"}
    with git_http_server(tmp_path / "served", accepted) as server:
        urls = {"comfyui": server.publish(Path(unquote(standin_repo[0][len("file://"):])),
                                          "comfyui")}
        for name, files in {
            "private": {"__init__.py": NODE_INIT, "install.py": INSTALL_PY},
            "shared": {"__init__.py": NODE_INIT},
        }.items():
            make_repo(tmp_path / "src" / name, files)
            urls[name] = server.publish(tmp_path / "src" / name, name)
        urls["port"] = str(server.port)
        yield urls
        assert any(s.authorization == f"Bearer {NODE_TOKEN}" for s in server.seen)
        assert any(s.authorization == basic("user", COMFY_SECRET) for s in server.seen)
        assert any(s.status == 401 for s in server.seen)  # the wrong password
        assert any(s.status == 404 for s in server.seen)  # the repository that is not there


def _metrics(node: Node) -> str:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_no_secret_anywhere_after_a_boot_from_private_repositories(
    make_node: Callable[..., Node],
    standin_repo: tuple[str, str],
    private_server: dict[str, str],
    tmp_path: Path,
) -> None:
    port = private_server["port"]
    config = tmp_path / "machine.toml"  # outside the workspace: it is the user's file
    config.write_text(
        f'[[custom_nodes]]\nurl = "{private_server["private"]}"\nauth_env = "NODE_TOKEN"\n'
        f'[[custom_nodes]]\nurl = "{private_server["shared"]}"\nauth_env = "PASSED_TOKEN"\n'
    )
    wrong = f"http://user:{WRONG_SECRET}@127.0.0.1:{port}/private.git"
    missing = f"http://user:{COMFY_SECRET}@127.0.0.1:{port}/missing.git"
    node = make_node(
        gpus=1,
        COMFYUI_REPO=f"http://user:{COMFY_SECRET}@127.0.0.1:{port}/comfyui.git",
        COMFYUI_REF=standin_repo[1],
        MACHINE_CONFIG=str(config),
        COMFYUI_CUSTOM_NODES=f"{wrong.replace('private', 'denied')},{missing}",
        NODE_TOKEN=NODE_TOKEN,
        PASSED_TOKEN=PASS_TOKEN,
        INSTANCE_PASS_ENV="PASSED_TOKEN",
        GIT_RETRIES="0",
    )
    with ArgvWatch() as argv:
        node.start()
        code, body = wait_until(
            lambda: (lambda r: r if r[1].get("status") in ("degraded", "failed") else None)(
                node.get("/health/comfyui?wait=5")
            ),
            120,
            "the node to come up degraded (two nodes cannot be fetched)",
        )
    assert code == 200 and body["ready_instances"] == 1, (body, node.log())
    # The watch did see git at work on these URLs (without their credentials).
    assert any(
        f" ls-remote --end-of-options http://127.0.0.1:{port}/" in c for c in argv.seen.values()
    ), argv.seen

    _, install = node.get("/health/comfyui/installation")
    nodes = {n["name"]: n for n in install["custom_nodes"]}
    assert nodes["private"]["status"] == "ok" and nodes["shared"]["status"] == "ok", nodes
    assert nodes["denied"]["status"] == "failed" and "401" in nodes["denied"]["error"]
    assert nodes["missing"]["status"] == "failed" and "missing.git" in nodes["missing"]["error"]
    assert nodes["missing"]["url"] == f"http://127.0.0.1:{port}/missing.git"

    # The instance inherits the token INSTANCE_PASS_ENV names, not the node's own.
    instance = psutil.Process(body["instances"][0]["pid"]).environ()
    assert instance.get("PASSED_TOKEN") == PASS_TOKEN
    assert "NODE_TOKEN" not in instance and "COMFYUI_REPO" not in instance
    install_log = node.workspace / "logs" / "install" / "private.log"
    assert "NODE_TOKEN seen: False" in install_log.read_text()
    assert "COMFYUI_REPO seen: False" in install_log.read_text()

    answers = {
        path: str(node.get(path)[1])
        for path in ("/health/comfyui", "/health/comfyui/installation",
                     "/health/comfyui/instances", "/health/comfyui/models")
    }
    answers["/metrics"] = _metrics(node)
    node.stop()

    leaks = [
        f"{where}: {secret}"
        for secret in SECRETS
        for where, text in [
            *answers.items(),
            *((f"argv of pid {pid}", cmd) for pid, cmd in argv.seen.items()),
        ]
        if secret in text
    ]
    for path in node.workspace.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            leaks += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    assert not leaks, leaks
    assert (node.workspace / "agent.log").stat().st_size > 0

    # State files are for the owner and its group only.
    for path in [
        node.workspace / "comfy-machine.lock",
        install_log,
        node.workspace / "logs" / "comfyui-gpu0.log",
        node.workspace / "logs" / "supervisord.log",
        node.workspace / "run" / "supervisord.conf",
    ]:
        assert path.stat().st_mode & 0o027 == 0, f"{path} is {oct(path.stat().st_mode)}"
