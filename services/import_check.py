"""Did ComfyUI load each custom node? Read from its start-up log (the only place failures are
reported) and confirmed against /object_info (a loaded node's classes carry its module)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMPORT_TIMES = "Import times for custom nodes:"
# `   0.0 seconds (IMPORT FAILED): /path/ComfyUI/custom_nodes/broken_node`
FAILED_LINE = re.compile(r"^\s+[\d.]+ seconds \(IMPORT FAILED\): (?P<path>.+?)\s*$")
# `Cannot import /path/custom_nodes/broken_node module for custom nodes: No module named 'x'`
CANNOT_IMPORT = re.compile(r"Cannot import (?P<path>.+?) module for custom nodes: (?P<error>.*)$")
# `Skip /path/custom_nodes/x module for custom nodes due to the lack of NODE_CLASS_MAPPINGS.`
SKIPPED = re.compile(r"Skip (?P<path>.+?) module for custom nodes due to (?P<error>.*)$")


@dataclass(frozen=True)
class ImportResult:
    """Per node directory name: None if it loaded, else the error line."""

    failures: dict[str, str]
    complete: bool  # the import-times block was found (ComfyUI finished loading nodes)


def parse_startup_log(text: str) -> ImportResult:
    """Failures of the last start in ``text`` (the log accumulates across restarts)."""
    start = text.rfind(IMPORT_TIMES)
    if start < 0:
        return ImportResult({}, complete=False)
    previous = text.rfind(IMPORT_TIMES, 0, start)
    run_text = text[previous + 1 if previous >= 0 else 0 :]
    errors = {}
    for line in run_text[: start - (previous + 1 if previous >= 0 else 0)].splitlines():
        match = CANNOT_IMPORT.search(line) or SKIPPED.search(line)
        if match:
            errors[Path(match["path"].strip()).name] = match["error"].strip()
    failures = {}
    for line in text[start:].splitlines()[1:]:
        if not line.strip():
            break
        match = FAILED_LINE.match(line)
        if match:
            name = Path(match["path"]).name
            failures[name] = errors.get(name, "import failed (see the instance log)")
    return ImportResult(failures, complete=True)


def modules_loaded(object_info: dict[str, Any]) -> set[str]:
    """Custom node directory names that contributed at least one node class."""
    loaded = set()
    for info in object_info.values():
        module = str(info.get("python_module", "")) if isinstance(info, dict) else ""
        if module.startswith("custom_nodes."):
            loaded.add(module.removeprefix("custom_nodes.").split(".", 1)[0])
    return loaded
