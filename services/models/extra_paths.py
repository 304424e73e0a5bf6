"""extra_model_paths.yaml: every instance sees the one model store (nothing is copied)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import yaml

from config.models import KNOWN_FOLDERS, LEGACY_FOLDERS
from services.files import atomic_write_text

SECTION = "comfy_machine"


def render_extra_model_paths(models_path: Path, folders: Iterable[str] = ()) -> str:
    """The yaml text: one section, ``base_path`` = the store, each folder type -> its
    directories (a legacy directory such as ``unet`` listed under its current name)."""
    by_type: dict[str, list[str]] = {}
    for folder in (*KNOWN_FOLDERS, *sorted(set(folders))):
        listed = LEGACY_FOLDERS.get(folder, folder)
        paths = by_type.setdefault(listed, [])
        if folder not in paths:
            paths.append(folder)
    section: dict[str, object] = {"base_path": str(models_path), "is_default": True}
    section.update({name: "\n".join(paths) for name, paths in by_type.items()})
    header = "# Written by comfy-machine from COMFYUI_MODELS_PATH; edits are overwritten.\n"
    return header + yaml.safe_dump({SECTION: section}, sort_keys=False)


def write_extra_model_paths(path: Path | None, text: str, models_path: Path | None) -> None:
    """Write the plan's yaml (and make the store) before any instance starts."""
    if path is None or models_path is None:
        return
    models_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
