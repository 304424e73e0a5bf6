"""One digest of everything Settings is read from, computed with the standard library alone (no
pydantic: its import is what the callers avoid; issue 14).

Settings come from their environment variables, the files they name (MACHINE_CONFIG, the
snapshot, workflows, paths), the working directory (relative paths), the user, the Python and
the agent's own code (a changed agent may read the same inputs differently). A caller that knows
which variables and files a previous run read (it keeps their names beside the digest) can tell
whether Settings would come out the same without loading them: the warm boot's head start
(services/supervisor/head_start.py) and `plan`'s cache (machine/plan_cache.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

DIGEST_VERSION = 1
# The agent's own packages.
_CODE_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("config", "services", "health", "machine")


def _identity(path: str) -> list[object]:
    """What tells a changed file from an unchanged one (for a directory: which one it is, since
    its mtime moves whenever a file is added to it)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return [path, exc.errno]
    if stat.S_ISDIR(st.st_mode):
        return [path, st.st_dev, st.st_ino, st.st_mode]
    return [path, st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns]


def code_identity() -> list[object]:
    """Every source file of the agent, by name, size and mtime (~120 stats)."""
    found: list[object] = []
    for package in _PACKAGES:
        for folder, dirs, files in os.walk(_CODE_ROOT / package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(folder, name))
                    found.append([os.path.join(folder, name), st.st_size, st.st_mtime_ns])
    return found


def inputs_digest(
    environ: Mapping[str, str], env_names: Iterable[str], files: Iterable[str]
) -> str:
    """SHA-256 over the ``env_names`` variables of ``environ`` (case-insensitive, empty as
    unset: as load_settings reads them), the identity of ``files``, and the working
    directory, user, Python and agent code, as of now."""
    env = {key.upper(): value for key, value in environ.items()}
    blob = json.dumps([
        DIGEST_VERSION,
        sorted((name, env.get(name) or None) for name in env_names),
        [_identity(path) for path in files],
        os.getcwd(),
        os.geteuid(),
        sys.executable,
        sys.version,
        code_identity(),
    ])
    return hashlib.sha256(blob.encode()).hexdigest()
