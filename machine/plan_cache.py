"""`comfy-machine plan`'s last answer, reused while nothing it was made from has changed.

Loading Settings (pydantic, pydantic-settings) takes ~0.25 s of a 2-core box before `plan` can
say anything (issue 14 asks for 150 ms). A plan is a pure function of the settings' inputs (their
environment variables, the files they name, the working directory, the user, the Python, the
agent's code: config/inputs_digest.py), so the printed plan is kept in the user's cache
directory with the digest of those inputs and printed again while the digest is the same.
Only plans that read nothing else are kept: not in GPU mode (NVML's answer is not an input
the digest covers) and not with the proxy (its binary is looked up on PATH)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from config.inputs_digest import inputs_digest

CACHE_VERSION = 1


def cache_path(environ: Mapping[str, str], as_json: bool) -> Path:
    """$XDG_CACHE_HOME/comfy-machine/plan[-json].json (~/.cache when unset)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfy-machine" / ("plan-json.json" if as_json else "plan.json")


def cached_plan(environ: Mapping[str, str], as_json: bool) -> str | None:
    """The kept plan when it was made from these very inputs; else None."""
    try:
        kept = json.loads(cache_path(environ, as_json).read_text())
        if kept.get("version") != CACHE_VERSION:
            return None
        digest = inputs_digest(environ, kept["env_names"], kept["files"])
        return str(kept["output"]) if digest == kept["digest"] else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def keep_plan(
    environ: Mapping[str, str], as_json: bool, env_names: list[str], files: list[str], output: str
) -> None:
    """Keep ``output`` for the next `plan` with the same inputs (0600; never fails the command)."""
    from services.files import atomic_write_text

    path = cache_path(environ, as_json)
    record = {"version": CACHE_VERSION, "digest": inputs_digest(environ, env_names, files),
              "env_names": env_names, "files": files, "output": output}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record), mode=0o600)
    except OSError:
        pass  # a read-only home: the next plan is computed again
