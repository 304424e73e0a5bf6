"""Model filenames a ComfyUI API-format workflow references (pure: JSON in, refs out)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ComfyUI's supported_pt_extensions, plus GGUF (custom loaders) and ONNX.
MODEL_EXTENSIONS = (
    ".ckpt",
    ".pt",
    ".pt2",
    ".bin",
    ".pth",
    ".safetensors",
    ".pkl",
    ".sft",
    ".gguf",
    ".onnx",
)


@dataclass(frozen=True)
class WorkflowRef:
    """One input of one node naming a model file."""

    workflow: str  # the file's path as configured
    node: str  # node id in the workflow
    class_type: str
    input: str
    file: str


class WorkflowError(ValueError):
    """The file is not an API-format workflow; the message says what to do."""


def parse_workflow(name: str, data: Any) -> list[WorkflowRef]:
    """Every string input ending in a model extension, in node order."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise WorkflowError(
            f"workflow {name}: this is the UI format (it has 'nodes'); export it "
            "with 'Save (API)' / 'Export (API)' instead"
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved POST /prompt body
    if not isinstance(data, dict):
        raise WorkflowError(f"workflow {name}: expected a JSON object of node id -> node")
    refs = []
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(
                f"workflow {name}: node {node_id!r} has no class_type; is this an "
                "API-format workflow?"
            )
        for key, value in (node.get("inputs") or {}).items():
            if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
                refs.append(WorkflowRef(name, str(node_id), node["class_type"], key, value))
    return refs


def read_workflows(paths: list[Path]) -> tuple[list[WorkflowRef], list[str]]:
    """(references, errors) from every workflow file; an unreadable file is an error line."""
    refs: list[WorkflowRef] = []
    errors: list[str] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            refs += parse_workflow(str(path), data)
        except OSError as exc:
            errors.append(f"workflow {path}: cannot be read: {exc.strerror}")
        except json.JSONDecodeError as exc:
            errors.append(f"workflow {path}: not JSON: {exc}")
        except WorkflowError as exc:
            errors.append(str(exc))
    return refs, errors
