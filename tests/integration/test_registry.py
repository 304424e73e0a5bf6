"""Custom nodes from the Comfy Registry, end to end through the real installer: a registry
stand-in (tests/registry.py, shaped after the published API) answers the install endpoint and
serves zip archives built here; git for ComfyUI, a real virtualenv and uv resolving tiny wheels
from a local directory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import git
import pytest

from config.nodes import CustomNodeSpec
from config.settings import custom_node_specs, load_settings
from health.checks import installation_report
from machine.warm_start import install_inputs
from services.install.installer import Installer, InstallInputs
from services.install.lock import read_lock
from services.install.registry import RegistryError, nearest_first, resolve
from services.install.unpack import STAGING_DIR
from services.models.download import FetchOptions
from services.state import MachineState, NodeStatus, Phase, StepStatus
from tests.integration.test_installer import Steps, make_repo
from tests.packages import build_wheel
from tests.registry import RegistryStandIn, zip_bytes
from tests.support import Node

FAST = FetchOptions(retries=2, backoff_s=0.01, backoff_max_s=0.05, connect_timeout_s=2,
                    read_timeout_s=5)


def node_archive(
    node_id: str, version: str, requirements: str | None = None, **extra: str
) -> bytes:
    """A registry node pack as `comfy node pack` makes one: pyproject.toml (name = the id,
    version) and the node's files at the top of the archive."""
    files: dict[str, str | bytes] = {
        "pyproject.toml": f'[project]\nname = "{node_id}"\nversion = "{version}"\n',
        "__init__.py": f"NODE_CLASS_MAPPINGS = {{}}\nVERSION = {version!r}\n",
        "nodes/impl.py": "X = 1\n",
        **extra,
    }
    if requirements is not None:
        files["requirements.txt"] = requirements
    return zip_bytes(files)


@pytest.fixture
def registry() -> Iterator[RegistryStandIn]:
    standin = RegistryStandIn().start()
    yield standin
    standin.stop()


@pytest.fixture
def wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "wheels"
    for name, version, requires in [
        ("torch", "1.0", ()),
        ("shared", "1.0", ()),
        ("shared", "2.0", ()),
        ("pin-shared-1", "1.0", ("shared==1.0",)),
        ("pin-shared-2", "1.0", ("shared==2.0",)),
        ("tiny", "1.0", ()),
    ]:
        build_wheel(directory, name, version, requires)
    config = tmp_path / "uv.toml"
    config.write_text(f'no-index = true\nfind-links = ["{directory}"]\n')
    monkeypatch.setenv("UV_CONFIG_FILE", str(config))
    monkeypatch.setenv("UV_OFFLINE", "1")
    return directory


@pytest.fixture
def comfyui(tmp_path: Path) -> str:
    return make_repo(tmp_path / "src" / "ComfyUI",
                     {"main.py": "print('comfy')\n", "requirements.txt": "torch\n"}, tag="v1")


def registry_node(name: str, ref: str = "latest") -> CustomNodeSpec:
    return CustomNodeSpec(name, "", ref, False, True, "test", kind="registry", registry_id=name)


def make_inputs(
    tmp_path: Path,
    comfyui: str,
    registry: RegistryStandIn,
    nodes: tuple[CustomNodeSpec, ...],
    on_conflict: str = "skip-node",
    **more: object,
) -> InstallInputs:
    ws = tmp_path / "ws"
    return InstallInputs(
        comfyui_url=comfyui,
        comfyui_ref="v1",
        install_path=ws / "ComfyUI",
        nodes=nodes,
        python=ws / "venv" / "bin" / "python",
        venv=ws / "venv",
        base_python=sys.executable,
        protected=(),
        on_conflict=on_conflict,
        install_py_timeout=30,
        workers=4,
        workspace=ws,
        min_free_bytes=0,
        registry_url=registry.url,
        registry_options=FAST,
        **more,  # type: ignore[arg-type]
    )


def custom_nodes(tmp_path: Path) -> Path:
    return tmp_path / "ws" / "ComfyUI" / "custom_nodes"


def test_install_by_id_and_version_lock_warm_boot_and_a_changed_version(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    alpha_1 = node_archive("alpha", "1.0.0", "tiny\n")
    alpha_2 = node_archive("alpha", "1.1.0", "tiny\n")
    registry.publish("alpha", "1.0.0", alpha_1)
    registry.publish("alpha", "1.1.0", alpha_2)  # the latest
    registry.publish("beta", "2.0.0", node_archive("beta", "2.0.0", "pin-shared-1\n"))
    registry.download_query = "?sig=secret-signature"  # a signed URL: never locked or shown
    git_node = make_repo(tmp_path / "src" / "gitnode", {"__init__.py": "",
                                                       "requirements.txt": "shared\n"}, tag="v1")
    nodes = (
        registry_node("alpha"),  # unversioned: the latest, resolved once
        registry_node("beta", "2.0.0"),
        CustomNodeSpec("gitnode", git_node, "v1", False, True, "test"),
    )
    steps = Steps()
    report = Installer(make_inputs(tmp_path, comfyui, registry, nodes), steps).run()
    status = {n.name: n for n in report.nodes}
    assert {n: s.status for n, s in status.items()} == dict.fromkeys(status, NodeStatus.OK)
    assert (status["alpha"].source, status["alpha"].version) == ("registry", "1.1.0")
    base = custom_nodes(tmp_path)
    assert "VERSION = '1.1.0'" in (base / "alpha" / "__init__.py").read_text()
    assert (base / "alpha" / "nodes" / "impl.py").is_file()
    # ComfyUI-Manager's tracking file: the archive's member names, so Manager sees a cnr node
    # (it reads the id and version from pyproject.toml beside it).
    tracking = (base / "alpha" / ".tracking").read_text().splitlines()
    assert set(tracking) == {"pyproject.toml", "__init__.py", "nodes/impl.py", "requirements.txt"}
    project = tomllib.loads((base / "alpha" / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("alpha", "1.1.0")
    assert not list((base / STAGING_DIR).iterdir())  # no archive or staging left behind
    # One resolution for registry and git nodes together.
    assert steps.final["resolve"][0] is StepStatus.DONE
    assert "4 requirement file(s)" in steps.final["resolve"][1]  # ComfyUI's and 3 nodes'
    assert steps.final["fetch alpha"][0] is StepStatus.DONE
    assert steps.final["fetch alpha"][1].startswith("installed alpha 1.1.0 from ")
    # The lock pins id, version, the download URL without its query, and the archive's sha256.
    lock_path = tmp_path / "ws" / "comfy-machine.lock"
    lock = read_lock(lock_path)
    assert lock is not None
    alpha = lock.nodes["alpha"]
    assert (alpha.source, alpha.registry_id, alpha.ref, alpha.version) == (
        "registry", "alpha", "latest", "1.1.0")
    assert alpha.sha256 == hashlib.sha256(alpha_2).hexdigest()
    assert alpha.url == f"{registry.url}/archives/alpha/1.1.0/node.zip"
    assert alpha.registry_url == registry.url
    assert lock.nodes["beta"].version == "2.0.0" and lock.nodes["gitnode"].source == "git"
    assert "secret-signature" not in lock_path.read_text()
    assert "secret-signature" not in json.dumps([s[1] for s in steps.final.values()])
    # /health/comfyui/installation shows a registry node like a git node.
    state = MachineState()
    state.set_phase(Phase.READY)
    state.custom_nodes = {n.name: n for n in report.nodes}
    for step_name, (step_status, detail, error) in steps.final.items():
        step = state.step(step_name)
        step.status, step.detail, step.error = step_status, detail, error
    code, body = installation_report(state, time.time())
    shown = {n["name"]: n for n in body["custom_nodes"]}
    assert code == 200
    assert {k: shown["alpha"][k] for k in ("source", "id", "version", "status")} == {
        "source": "registry", "id": "alpha", "version": "1.1.0", "status": "ok"}
    assert shown["alpha"]["import_checked"] is False and shown["gitnode"]["source"] == "git"

    # A warm boot with the same list asks the registry nothing, even with a newer version out.
    registry.publish("alpha", "1.2.0", node_archive("alpha", "1.2.0"))
    registry.requests.clear()
    warm_steps = Steps()
    warm = Installer(make_inputs(tmp_path, comfyui, registry, nodes), warm_steps).run()
    assert warm.warm and sum(registry.requests.values()) == 0
    assert {s for s, _, _ in warm_steps.final.values()} == {StepStatus.SKIPPED}
    assert {n.name: n.version for n in warm.nodes if n.source == "registry"} == {
        "alpha": "1.1.0", "beta": "2.0.0"}

    # A changed version re-installs just that node; the others are not asked about.
    registry.publish("beta", "2.1.0", node_archive("beta", "2.1.0", "pin-shared-1\n"))
    changed = (nodes[0], registry_node("beta", "2.1.0"), nodes[2])
    steps = Steps()
    report = Installer(make_inputs(tmp_path, comfyui, registry, changed), steps).run()
    assert not report.warm
    assert steps.final["fetch beta"][1].startswith("replaced beta 2.1.0 from ")
    assert steps.final["fetch alpha"] == (StepStatus.SKIPPED, "skipped: alpha 1.1.0 as locked",
                                          None)
    assert steps.final["checkout gitnode"][0] is StepStatus.SKIPPED
    assert not [p for p in registry.requests if "/alpha/" in p]
    assert "VERSION = '2.1.0'" in (base / "beta" / "__init__.py").read_text()
    assert read_lock(lock_path).nodes["beta"].version == "2.1.0"  # type: ignore[union-attr]


def test_unknown_id_and_version_fail_that_node_naming_what_exists(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    for version in ("1.0.0", "1.0.5", "1.1.0"):
        registry.publish("alpha", version, node_archive("alpha", version))
    nodes = (registry_node("nope"), registry_node("alpha", "1.0.9"), registry_node("alpha2"))
    registry.publish("alpha2", "0.1.0", node_archive("alpha2", "0.1.0"))
    report = Installer(make_inputs(tmp_path, comfyui, registry, nodes), Steps()).run()
    status = {n.name: n for n in report.nodes}
    assert status["nope"].status == NodeStatus.FAILED
    assert "has no node with id 'nope' (HTTP 404)" in (status["nope"].error or "")
    assert f"COMFY_REGISTRY_URL={registry.url}" in (status["nope"].error or "")
    assert status["alpha"].status == NodeStatus.FAILED
    assert ("has no version '1.0.9' of alpha; versions offered, nearest first: "
            "1.0.5, 1.0.0, 1.1.0") in (status["alpha"].error or "")
    # The others install: a node's failure is its own.
    assert status["alpha2"].status == NodeStatus.OK
    assert not (custom_nodes(tmp_path) / "nope").exists()
    assert not (custom_nodes(tmp_path) / "alpha").exists()


def test_registry_down_is_retried_then_fails_naming_the_setting(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    registry.publish("alpha", "1.0.0", node_archive("alpha", "1.0.0"))
    registry.down = True
    steps = Steps()
    report = Installer(
        make_inputs(tmp_path, comfyui, registry, (registry_node("alpha", "1.0.0"),)), steps
    ).run()
    (alpha,) = report.nodes
    assert alpha.status == NodeStatus.FAILED
    assert registry.requests["/nodes/alpha/install"] == FAST.retries + 1
    assert (f"the Comfy Registry at COMFY_REGISTRY_URL={registry.url} could not be reached: "
            "gave up after 3 attempts (last: HTTP 503)") in (alpha.error or "")
    assert steps.final["fetch alpha"][0] is StepStatus.FAILED


def test_unreachable_registry_is_a_connection_failure_after_retries() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def ask() -> None:
        async with aiohttp.ClientSession() as session:
            await resolve(session, url, "alpha", None, FAST, "custom node alpha")

    with pytest.raises(RegistryError) as info:
        asyncio.run(ask())
    assert str(info.value).startswith(
        f"custom node alpha: the Comfy Registry at COMFY_REGISTRY_URL={url} could not be "
        "reached: gave up after 3 attempts (last: ClientConnectorError)"
    )


def test_nearest_versions_first() -> None:
    offered = ["2.0.0", "1.0.0", "1.2.0", "1.1.3", "1.1.1", "0.9.0"]
    assert nearest_first("1.1.2", offered) == ["1.1.3", "1.1.1", "1.2.0", "1.0.0", "2.0.0",
                                               "0.9.0"]


def test_archives_that_escape_or_overflow_are_refused_with_nothing_loaded(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    innocent = {"pyproject.toml": '[project]\nname = "x"\nversion = "1.0.0"\n',
                "__init__.py": "NODE_CLASS_MAPPINGS = {}\n"}
    archives = {
        "slip": zip_bytes({**innocent, "../../evil.py": "PWNED = 1\n"}),
        "absolute": zip_bytes({**innocent, f"{tmp_path}/abs-evil.py": "PWNED = 1\n"}),
        "linkout": zip_bytes(innocent, symlinks={"data": "../../../.."}),
        "linkabs": zip_bytes(innocent, symlinks={"etc": "/etc"}),
        # Each link stays inside by itself; followed together they lead out.
        "chain": zip_bytes(innocent, symlinks={"top": ".", "out": "top/.."}),
        "bomb": zip_bytes({**innocent, "zeros.bin": b"\0" * 300_000}),
        "notzip": b"this is not a zip file",
        "fine": node_archive("fine", "1.0.0"),
    }
    for node_id, archive in archives.items():
        registry.publish(node_id, "1.0.0", archive)
    nodes = tuple(registry_node(n) for n in archives)
    report = Installer(
        make_inputs(tmp_path, comfyui, registry, nodes, max_unpacked_bytes=100_000), Steps()
    ).run()
    errors = {n.name: n.error or "" for n in report.nodes}
    status = {n.name: n.status for n in report.nodes}
    assert status == {**dict.fromkeys(archives, NodeStatus.FAILED), "fine": NodeStatus.OK}
    assert "'../../evil.py' has a '..' part (zip-slip)" in errors["slip"]
    assert "is an absolute path (zip-slip)" in errors["absolute"]
    assert "'data' is a symlink to '../../../..', outside the node's folder" in errors["linkout"]
    assert "'etc' is a symlink to '/etc', outside" in errors["linkabs"]
    assert "'out' is a symlink to 'top/..' that resolves outside" in errors["chain"]
    assert "more than the cap of 100000" in errors["bomb"]
    assert "is not a readable zip file" in errors["notzip"]
    for node_id in archives:
        if node_id != "fine":
            assert "nothing of it was installed" in errors[node_id], node_id
            assert not (custom_nodes(tmp_path) / node_id).exists()
    # Nothing was written outside: not beside custom_nodes, not at the absolute path.
    assert not list(tmp_path.rglob("evil.py")) and not list(tmp_path.rglob("abs-evil.py"))
    assert not list((custom_nodes(tmp_path) / STAGING_DIR).iterdir())
    assert (custom_nodes(tmp_path) / "fine" / "__init__.py").is_file()


def test_hash_change_between_lock_and_redownload_is_refused(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    original = node_archive("alpha", "1.0.0")
    registry.publish("alpha", "1.0.0", original)
    nodes = (registry_node("alpha", "1.0.0"),)
    Installer(make_inputs(tmp_path, comfyui, registry, nodes), Steps()).run()
    node_dir = custom_nodes(tmp_path) / "alpha"
    (node_dir / "nodes" / "impl.py").unlink()  # a damaged tree: repaired by a re-download
    # ... but the registry now serves other bytes under the same version.
    registry.publish("alpha", "1.0.0", node_archive("alpha", "1.0.0", TAMPERED="yes"))
    steps = Steps()
    report = Installer(make_inputs(tmp_path, comfyui, registry, nodes), steps).run()
    (alpha,) = report.nodes
    assert alpha.status == NodeStatus.FAILED
    expected = hashlib.sha256(original).hexdigest()
    assert f"but the lock recorded {expected} when it was installed" in (alpha.error or "")
    assert "nothing of it was installed" in (alpha.error or "")
    assert not (node_dir / "TAMPERED").exists()
    # The lock keeps the pin: the next boot refuses the changed archive again.
    lock = read_lock(tmp_path / "ws" / "comfy-machine.lock")
    assert lock is not None and lock.nodes["alpha"].sha256 == expected
    again = Installer(make_inputs(tmp_path, comfyui, registry, nodes), Steps()).run()
    assert again.nodes[0].status == NodeStatus.FAILED and not (node_dir / "TAMPERED").exists()
    # The original bytes back: the tree is repaired from them, no error.
    registry.publish("alpha", "1.0.0", original)
    repaired = Installer(make_inputs(tmp_path, comfyui, registry, nodes), Steps()).run()
    assert repaired.nodes[0].status == NodeStatus.OK and (node_dir / "nodes" / "impl.py").exists()


def test_a_directory_not_installed_from_the_registry_is_never_replaced(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    registry.publish("mine", "1.0.0", node_archive("mine", "1.0.0"))
    Installer(make_inputs(tmp_path, comfyui, registry, ()), Steps()).run()
    own = custom_nodes(tmp_path) / "mine"
    own.mkdir(parents=True)
    (own / "__init__.py").write_text("# my own work\n")
    report = Installer(make_inputs(tmp_path, comfyui, registry, (registry_node("mine"),)),
                       Steps()).run()
    assert report.nodes[0].status == NodeStatus.FAILED
    assert "custom_nodes/mine already exists and was not installed from the registry" in (
        report.nodes[0].error or "")
    assert (own / "__init__.py").read_text() == "# my own work\n"
    assert sum(registry.requests.values()) == 0  # refused before asking anything


def test_skip_node_applies_to_registry_nodes(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    registry.publish("first", "1.0.0", node_archive("first", "1.0.0", "pin-shared-1\n"))
    registry.publish("second", "1.0.0", node_archive("second", "1.0.0", "pin-shared-2\n"))
    registry.publish("reaches", "1.0.0", node_archive("reaches", "1.0.0", "-r ../../x.txt\n"))
    nodes = (registry_node("first"), registry_node("second"), registry_node("reaches"))
    report = Installer(make_inputs(tmp_path, comfyui, registry, nodes), Steps()).run()
    status = {n.name: n for n in report.nodes}
    assert status["first"].status == NodeStatus.OK
    assert status["second"].status == NodeStatus.SKIPPED
    assert "first" in (status["second"].error or "")
    assert status["reaches"].status == NodeStatus.SKIPPED
    assert "requirements refused" in (status["reaches"].error or "")
    base = custom_nodes(tmp_path)
    assert (base / ".disabled" / "second").is_dir() and not (base / "second").exists()
    assert (base / ".disabled" / "reaches").is_dir()


def test_manager_snapshot_cnr_nodes_through_the_settings(
    tmp_path: Path, comfyui: str, registry: RegistryStandIn, wheels: Path
) -> None:
    registry.publish("alpha", "1.0.0", node_archive("alpha", "1.0.0"))
    registry.publish("alpha", "1.1.0", node_archive("alpha", "1.1.0"))
    with git.Repo(tmp_path / "src" / "ComfyUI") as repo:
        commit = repo.head.commit.hexsha
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps({
        "comfyui": commit, "git_custom_nodes": {}, "cnr_custom_nodes": {"alpha": "1.0.0"},
        "file_custom_nodes": [], "pips": {},
    }))
    settings = load_settings({
        "COMFYUI_REPO": comfyui, "CUSTOM_NODES_SNAPSHOT": str(snapshot),
        "MACHINE_WORKSPACE": str(tmp_path / "ws"), "INSTALL_MIN_FREE_GB": "0",
        "COMFY_REGISTRY_URL": registry.url + "/", "COMFYUI_CPU_ONLY": "1",
    })
    specs, comfyui_ref = custom_node_specs(settings)
    assert comfyui_ref == commit
    assert [(s.name, s.kind, s.registry_id, s.ref) for s in specs] == [
        ("alpha", "registry", "alpha", "1.0.0")]
    report = Installer(install_inputs(settings), Steps()).run()
    assert [(n.name, n.status, n.version) for n in report.nodes] == [
        ("alpha", NodeStatus.OK, "1.0.0")]
    assert registry.requests["/nodes/alpha/install"] == 1
    node_dir = tmp_path / "ws" / "ComfyUI" / "custom_nodes" / "alpha"
    assert (node_dir / ".tracking").is_file() and (node_dir / "pyproject.toml").is_file()


def test_install_command_prints_registry_progress_and_checks_the_import(
    workspace: Path, standin_repo: tuple[str, str], registry: RegistryStandIn
) -> None:
    from tests.integration.test_cli import run_cli

    registry.publish("alpha", "1.0.0", node_archive("alpha", "1.0.0"))
    url, commit = standin_repo
    env = {
        "COMFYUI_CPU_ONLY": "1",
        "COMFYUI_REPO": url,
        "COMFYUI_REF": commit,
        "COMFYUI_PYTHON": sys.executable,
        "MACHINE_WORKSPACE": str(workspace / "ws"),
        "INSTALL_MIN_FREE_GB": "0",
        "COMFYUI_CUSTOM_NODES": "alpha@1.0.0",
        "COMFY_REGISTRY_URL": registry.url,
    }
    out = run_cli("install", env=env)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    fetch = [e for e in events if e["step"] == "fetch alpha"]
    assert fetch[0]["status"] == "running" and fetch[-1]["status"] == "done"
    details = [e["detail"] for e in fetch]
    assert any(d.startswith(f"asking {registry.url} for alpha 1.0.0") for d in details)
    assert any(d.startswith("downloading alpha 1.0.0 from ") for d in details)
    assert fetch[-1]["detail"].startswith("installed alpha 1.0.0 from ")
    final = {e["step"]: e["status"] for e in events}
    assert final["import check"] == "done"
    # A bad id is a settings error: exit 2 naming the variable, the value and the fix.
    bad = run_cli("install", env={**env, "COMFYUI_CUSTOM_NODES": "alpha@not a version"})
    assert bad.returncode == 2
    assert ("COMFYUI_CUSTOM_NODES version=not a version: is not a registry version (semver, "
            "e.g. 1.2.3 or 1.2.3-beta.1); give a version" in bad.stderr), bad.stderr


def test_a_booted_node_shows_the_registry_node_with_its_import_check(
    make_node: Callable[..., Node], registry: RegistryStandIn
) -> None:
    from tests.support import wait_until

    registry.publish("alpha", "1.0.0", node_archive("alpha", "1.0.0"))
    node = make_node(gpus=1, COMFYUI_CUSTOM_NODES="alpha", COMFY_REGISTRY_URL=registry.url)
    node.start()
    node.wait_ready()
    _, install = wait_until(
        lambda: (lambda r: r if r[1]["custom_nodes"][0]["import_checked"] else None)(
            node.get("/health/comfyui/installation")
        ),
        30,
        "import check",
    )
    (alpha,) = install["custom_nodes"]
    assert {k: alpha[k] for k in ("name", "source", "id", "ref", "version", "status")} == {
        "name": "alpha", "source": "registry", "id": "alpha", "ref": "latest",
        "version": "1.0.0", "status": "ok"}, alpha["error"]
    assert alpha["url"] == f"{registry.url}/archives/alpha/1.0.0/node.zip"
    steps = {s["name"]: s for s in install["steps"]}
    assert steps["fetch alpha"]["status"] == "done"
