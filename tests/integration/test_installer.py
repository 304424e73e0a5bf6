"""The install phase with real git repositories, a real virtualenv and uv resolving tiny
wheels from a local directory: pins, conflicts, install.py, the lock and warm boots."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from config.errors import DiskFullError, InstallError
from config.nodes import CustomNodeSpec
from services.install import pyenv
from services.install.installer import Installer, InstallInputs
from services.install.lock import read_lock
from services.state import StepStatus
from tests.packages import build_wheel

AUTHOR = git.Actor("test", "test@example.invalid")


def make_repo(path: Path, files: dict[str, str], tag: str | None = None) -> str:
    """A git repository with ``files`` committed (and tagged); its file:// URL."""
    with git.Repo.init(path, initial_branch="main") as repo:
        for name, text in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        repo.git.add("--all")
        repo.index.commit("init", author=AUTHOR, committer=AUTHOR)
        if tag:
            repo.create_tag(tag)
    return path.as_uri()


@pytest.fixture
def wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "wheels"
    for name, version, requires in [
        ("torch", "1.0", ()),
        ("torch", "2.0", ()),
        ("shared", "1.0", ()),
        ("shared", "2.0", ()),
        ("needs-new-torch", "1.0", ("torch>=2",)),
        ("pin-shared-1", "1.0", ("shared==1.0",)),
        ("pin-shared-2", "1.0", ("shared==2.0",)),
        ("tiny", "1.0", ()),
        ("torchaudio", "9.0", ()),
        ("wants-other-torch", "1.0", ("torch!=1.0",)),
    ]:
        build_wheel(directory, name, version, requires)
    # uv's own config file: resolve from the local directory only, never the network.
    config = tmp_path / "uv.toml"
    config.write_text(f'no-index = true\nfind-links = ["{directory}"]\n')
    monkeypatch.setenv("UV_CONFIG_FILE", str(config))
    monkeypatch.setenv("UV_OFFLINE", "1")
    return directory


NODES = {
    "good": {
        "requirements.txt": "tiny\n",
        "__init__.py": "",
        "install.py": "from pathlib import Path\nPath('installed.marker').write_text('yes')\n",
    },
    "wants-new-torch": {"requirements.txt": "needs-new-torch\n", "__init__.py": ""},
    "replaces-torch": {"requirements.txt": "wants-other-torch\n", "__init__.py": ""},
    "first-shared": {"requirements.txt": "pin-shared-1\n", "__init__.py": ""},
    "second-shared": {"requirements.txt": "pin-shared-2\n", "__init__.py": ""},
    "bad-install": {"__init__.py": "", "install.py": "import sys\nprint('boom')\nsys.exit(3)\n"},
    "bad-line": {"requirements.txt": "tiny\nthis is not a requirement!\n", "__init__.py": ""},
}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    urls = {
        "ComfyUI": make_repo(
            tmp_path / "src" / "ComfyUI",
            {"main.py": "print('comfy')\n", "requirements.txt": "torch\n"},
            tag="v1",
        )
    }
    for name, files in NODES.items():
        urls[name] = make_repo(tmp_path / "src" / name, files, tag="v1")
    return urls


def inputs(
    tmp_path: Path,
    sources: dict[str, str],
    on_conflict: str = "skip-node",
    nodes: tuple[str, ...] = tuple(NODES),
    refs: dict[str, str] | None = None,
) -> InstallInputs:
    refs = refs or {}
    specs = tuple(
        CustomNodeSpec(n, sources[n], refs.get(n, "v1"), False, True, "test") for n in nodes
    )
    ws = tmp_path / "ws"
    return InstallInputs(
        comfyui_url=sources["ComfyUI"],
        comfyui_ref="v1",
        install_path=ws / "ComfyUI",
        nodes=specs,
        python=ws / "venv" / "bin" / "python",
        venv=ws / "venv",
        base_python=sys.executable,
        protected=("shared",),
        on_conflict=on_conflict,
        install_py_timeout=30,
        workers=4,
        workspace=ws,
        min_free_bytes=0,
    )


class Steps:
    def __init__(self) -> None:
        self.final: dict[str, tuple[StepStatus, str, str | None]] = {}

    def __call__(
        self, name: str, status: StepStatus, detail: str, error: str | None, duration: float | None
    ) -> None:
        self.final[name] = (status, detail, error)


@pytest.fixture
def preinstalled_torch(tmp_path: Path, wheels: Path) -> Iterator[None]:
    """The image's torch: installed before comfy-machine runs; no node may replace it."""
    venv = tmp_path / "ws" / "venv"
    pyenv.ensure_venv(venv, sys.executable)
    # From the wheel file, as images do: listed as `torch @ file://...` by pip freeze.
    wheel = next(wheels.glob("torch-1.0-*.whl"))
    result = pyenv._uv("pip", "install", "--python", str(venv / "bin" / "python"), str(wheel))
    assert result.ok, result.output
    yield


def test_cold_install_protects_torch_and_reports_each_node(
    tmp_path: Path, sources: dict[str, str], preinstalled_torch: None
) -> None:
    steps = Steps()
    report = Installer(inputs(tmp_path, sources), steps).run()
    status = {n.name: n for n in report.nodes}
    assert status["good"].status == "ok" and status["good"].commit
    ws = tmp_path / "ws"
    assert (ws / "ComfyUI" / "custom_nodes" / "good" / "installed.marker").exists()
    # The node that wanted a newer torch is skipped, named with the package; torch untouched.
    assert status["wants-new-torch"].status == "skipped"
    assert "torch" in status["wants-new-torch"].error
    packages = pyenv.installed(ws / "venv" / "bin" / "python")
    assert packages["torch"] == "1.0" and packages["tiny"] == "1.0"
    # Nor may a node replace it with another build, and a torchaudio built for some other
    # torch is not pulled in beside the image's torch.
    assert (
        status["replaces-torch"].status == "skipped" and "torch" in status["replaces-torch"].error
    )
    assert "torchaudio" not in packages
    # Of two nodes pinning `shared` differently, the later one is skipped and both are named.
    assert status["first-shared"].status == "ok"
    assert status["second-shared"].status == "skipped"
    assert "first-shared" in status["second-shared"].error
    assert packages["shared"] == "1.0"
    # A skipped node is moved out of ComfyUI's sight.
    assert (ws / "ComfyUI" / "custom_nodes" / ".disabled" / "second-shared").is_dir()
    assert not (ws / "ComfyUI" / "custom_nodes" / "second-shared").exists()
    # install.py failure and an unparseable requirements line are that node's failures.
    assert status["bad-install"].status == "failed" and "exited 3" in status["bad-install"].error
    assert "boom" in status["bad-install"].error
    assert status["bad-line"].status == "failed"
    assert "requirements.txt line 2" in status["bad-line"].error
    assert steps.final["install.py bad-install"][0] is StepStatus.FAILED
    assert steps.final["resolve"][0] is StepStatus.DONE
    assert "kept out: torchvision, torchaudio, xformers" in steps.final["resolve"][1]
    assert "pinned: torch==1.0;" in steps.final["resolve"][1]
    assert steps.final["install"][0] is StepStatus.DONE
    lock = read_lock(ws / "comfy-machine.lock")
    assert lock is not None and lock.comfyui.commit == report.comfyui_commit
    assert lock.packages["torch"] == "1.0"


def test_conflict_fails_by_default_naming_nodes_and_packages(
    tmp_path: Path, sources: dict[str, str], preinstalled_torch: None
) -> None:
    with pytest.raises(InstallError) as info:
        Installer(
            inputs(
                tmp_path,
                sources,
                on_conflict="fail",
                nodes=("good", "first-shared", "second-shared"),
            ),
            Steps(),
        ).run()
    message = str(info.value)
    assert "custom node second-shared conflicts with custom node first-shared" in message
    assert "shared" in message and 'set "skip-node"' in message
    assert read_lock(tmp_path / "ws" / "comfy-machine.lock") is None  # nothing taken as done


def test_warm_run_skips_and_a_change_redoes_only_its_part(
    tmp_path: Path, sources: dict[str, str], wheels: Path
) -> None:
    nodes = ("good", "first-shared")
    Installer(inputs(tmp_path, sources, nodes=nodes), Steps()).run()
    warm_steps = Steps()
    report = Installer(inputs(tmp_path, sources, nodes=nodes), warm_steps).run()
    assert report.warm
    assert {s for s, _, _ in warm_steps.final.values()} == {StepStatus.SKIPPED}
    # A new commit for one node: only it is checked out again.
    node_dir = tmp_path / "src" / "good"
    (node_dir / "extra.py").write_text("X = 1\n")
    with git.Repo(node_dir) as repo:
        repo.git.add("--all")
        repo.index.commit("v2", author=AUTHOR, committer=AUTHOR)
        repo.create_tag("v2")
    steps = Steps()
    report = Installer(inputs(tmp_path, sources, nodes=nodes, refs={"good": "v2"}), steps).run()
    assert not report.warm
    assert steps.final["checkout good"][1].startswith("updated at ")
    assert steps.final["checkout first-shared"][0] is StepStatus.SKIPPED
    assert steps.final["checkout ComfyUI"][0] is StepStatus.SKIPPED
    assert steps.final["resolve"][0] is StepStatus.SKIPPED  # same requirement files
    assert steps.final["install"][0] is StepStatus.SKIPPED
    assert steps.final["install.py good"][0] is StepStatus.DONE  # new commit: runs again


def test_tampered_environment_is_repaired(
    tmp_path: Path, sources: dict[str, str], wheels: Path
) -> None:
    Installer(inputs(tmp_path, sources, nodes=("good",)), Steps()).run()
    python = tmp_path / "ws" / "venv" / "bin" / "python"
    assert pyenv._uv("pip", "uninstall", "--python", str(python), "tiny").ok
    steps = Steps()
    report = Installer(inputs(tmp_path, sources, nodes=("good",)), steps).run()
    assert not report.warm and steps.final["install"][0] is StepStatus.DONE
    assert "tiny" in pyenv.installed(python)


def test_half_made_venv_is_not_taken(tmp_path: Path, sources: dict[str, str], wheels: Path) -> None:
    venv = tmp_path / "ws" / "venv"
    (venv / "bin").mkdir(parents=True)  # what a venv creation killed early leaves
    Installer(inputs(tmp_path, sources, nodes=()), Steps()).run()
    assert pyenv.python_works(venv / "bin" / "python")


def test_too_little_disk_is_a_disk_full_error(tmp_path: Path, sources: dict[str, str]) -> None:
    """Checked before anything is cloned; the error is a type, with the numbers."""
    too_much = dataclasses.replace(inputs(tmp_path, sources, nodes=()), min_free_bytes=2**62)
    steps = Steps()
    with pytest.raises(DiskFullError, match="INSTALL_MIN_FREE_GB"):
        Installer(too_much, steps).run()
    assert steps.final == {} and not (tmp_path / "ws" / "ComfyUI").exists()
