"""Where a model lives in the store, refusing any destination that leaves it (symlinks too)."""

from __future__ import annotations

from pathlib import Path

from config.models import RECORD_NAME, ModelSpec
from services.models.errors import ModelError

__all__ = ["RECORD_NAME", "destination", "part_meta_path", "part_path"]


def destination(models_path: Path, spec: ModelSpec) -> Path:
    """``<models_path>/<folder>/<filename>``, resolved; ModelError if it escapes the store."""
    root = models_path.resolve()
    target = (root / spec.folder / spec.filename).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ModelError(
            f"{spec.source} ({spec.name}): its destination resolves to {target}, outside "
            f"COMFYUI_MODELS_PATH={root} (a symlink pointing outside?); models stay in the store"
        )
    return target


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def part_meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")
