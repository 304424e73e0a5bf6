"""The Python environment ComfyUI runs in, driven by uv: create, freeze, install in one
resolution under constraints that protect the torch family."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import uv

from config.errors import InstallError
from services.install.requirements import normalize
from services.process_group import run_in_group

log = logging.getLogger(__name__)

TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "xformers")


@dataclass(frozen=True)
class UvResult:
    ok: bool
    output: str

    @property
    def cause(self) -> str:
        """uv's explanation of a failed resolution, on one line."""
        lines = [ln.strip() for ln in self.output.splitlines() if ln.strip()]
        start = next(
            (
                i
                for i, ln in enumerate(lines)
                if "No solution found" in ln or ln.startswith("error:")
            ),
            0,
        )
        text = " ".join(lines[start:])
        return re.sub(r"\s+", " ", text)[:2000]

    @property
    def unsatisfiable(self) -> bool:
        return "No solution found" in self.output


def _uv(*args: str, timeout: float = 1800) -> UvResult:
    # In its own process group, ended whole on a timeout and when the agent dies (even by
    # SIGKILL): a killed boot leaves no uv, and no build backend uv started, running.
    try:
        proc = run_in_group(
            [uv.find_uv_bin(), *args], timeout=timeout, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired as exc:
        output = "".join(str(part) for part in (exc.stdout, exc.stderr) if part)
        return UvResult(False, f"{output}\nerror: uv did not finish in {timeout:.0f}s")
    return UvResult(proc.returncode == 0, proc.stdout + proc.stderr)


def python_works(python: Path) -> bool:
    """The interpreter exists and starts."""
    if not python.exists():
        return False
    try:
        proc = run_in_group([str(python), "-c", "pass"], timeout=30, capture_output=True)
        return proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_venv(venv: Path, base_python: str) -> bool:
    """Create the managed virtualenv if it is missing or broken; True if it was (re)made."""
    python = venv / "bin" / "python"
    if python_works(python):
        return False
    # Build beside it and rename: a venv killed half-way is never taken for a whole one.
    partial = venv.with_name(f".{venv.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = _uv("venv", "--quiet", "--python", base_python, str(partial))
    if not result.ok:
        raise InstallError(f"python: cannot create the virtualenv {venv}: {result.cause}")
    # uv writes absolute paths of the partial directory into the activation scripts only;
    # bin/python is a symlink to the base interpreter, so the rename keeps it working.
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)
    for script in (venv / "bin").glob("activate*"):
        script.write_text(script.read_text().replace(str(partial), str(venv)))
    (venv / "pyvenv.cfg").write_text(
        (venv / "pyvenv.cfg").read_text().replace(str(partial), str(venv))
    )
    return True


def installed(python: Path) -> dict[str, str]:
    """Installed distributions of ``python``'s environment: normalized name -> version.

    From the metadata, not `pip freeze`: a torch installed from a wheel file freezes as
    `torch @ file://...` and would go unpinned."""
    result = _uv("pip", "list", "--format", "json", "--python", str(python), timeout=120)
    if not result.ok:
        raise InstallError(f"python: cannot list the packages of {python}: {result.cause}")
    start = result.output.find("[")
    try:
        entries = json.loads(result.output[start : result.output.rfind("]") + 1])
    except ValueError as exc:
        raise InstallError(f"python: unreadable package list of {python}: {exc}") from None
    return {normalize(e["name"]): e["version"] for e in entries}


def constraints(packages: dict[str, str], protected: list[str]) -> list[str]:
    """Pins for what is installed of the torch family and the protected packages."""
    names = {*TORCH_FAMILY, *(normalize(p) for p in protected)}
    return [f"{name}=={packages[name]}" for name in sorted(names) if name in packages]


def excluded(packages: dict[str, str]) -> list[str]:
    """Torch-family packages to keep out when torch is already installed but they are not: a
    PyPI torchaudio or xformers built for another torch breaks imports (ComfyUI runs without)."""
    if "torch" not in packages:
        return []
    return [name for name in TORCH_FAMILY if name not in packages]


@dataclass(frozen=True)
class Resolution:
    """Requirement files and the constraints and exclusions they resolve under."""

    files: list[Path]
    constraints_file: Path
    excludes_file: Path

    def args(self) -> list[str]:
        args = ["-c", str(self.constraints_file), "--excludes", str(self.excludes_file)]
        for path in self.files:
            args += ["-r", str(path)]
        return args


def install(python: Path, resolution: Resolution, dry_run: bool = False) -> UvResult:
    """One resolution of every file, installed into ``python``'s environment (or only
    resolved, with ``dry_run``)."""
    dry = ["--dry-run"] if dry_run else []
    return _uv("pip", "install", *dry, "--python", str(python), *resolution.args())


def summary(result: UvResult) -> str:
    """uv's one-line account of what it did or would do."""
    for line in result.output.splitlines():
        line = line.strip()
        if line.startswith(
            ("Would install", "Would make no changes", "Installed", "Audited", "Checked")
        ):
            return line
    return "done"
