"""The Python environment ComfyUI runs in, driven by uv: create, freeze, install in one
resolution under constraints that protect the torch family."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import uv

from machine.errors import InstallError
from services.install.requirements import normalize
from services.supervisor.launch import dies_with_us

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
    proc = subprocess.run(
        # Dies with the agent: a SIGKILLed boot leaves no uv running.
        dies_with_us([uv.find_uv_bin(), *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return UvResult(proc.returncode == 0, proc.stdout + proc.stderr)


def python_works(python: Path) -> bool:
    """The interpreter exists and starts."""
    if not python.exists():
        return False
    try:
        return (
            subprocess.run([str(python), "-c", "pass"], timeout=30, capture_output=True).returncode
            == 0
        )
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


def freeze(python: Path) -> dict[str, str]:
    """Installed distributions of ``python``'s environment: normalized name -> version."""
    result = _uv("pip", "freeze", "--python", str(python), timeout=120)
    if not result.ok:
        raise InstallError(f"python: cannot list the packages of {python}: {result.cause}")
    packages = {}
    for line in result.output.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            packages[normalize(name.strip())] = version.strip()
        elif " @ " in line:
            name, _, url = line.partition(" @ ")
            packages[normalize(name.strip())] = url.strip()
    return packages


def constraints(installed: dict[str, str], protected: list[str]) -> list[str]:
    """Pins for what is installed of the torch family and the protected packages."""
    pins = []
    for name in sorted({*TORCH_FAMILY, *(normalize(p) for p in protected)}):
        version = installed.get(name)
        if version and "://" not in version:
            pins.append(f"{name}=={version}")
    return pins


def install(python: Path, requirement_files: list[Path], constraints_file: Path) -> UvResult:
    """One resolution of every file under the constraints, installed into ``python``'s env."""
    args = ["pip", "install", "--python", str(python), "-c", str(constraints_file)]
    for path in requirement_files:
        args += ["-r", str(path)]
    return _uv(*args)


def resolves(python: Path, requirement_files: list[Path], constraints_file: Path) -> UvResult:
    """Would these files resolve together (nothing installed)?"""
    if not requirement_files:
        return UvResult(True, "")
    args = [
        "pip",
        "compile",
        "--quiet",
        "--python",
        str(python),
        "-c",
        str(constraints_file),
        "--no-header",
        "-o",
        "/dev/null",
    ]
    return _uv(*args, *(str(p) for p in requirement_files), timeout=600)
