"""The model manifest: ``[[models]]`` tables validated into specs. Pure: no file or network I/O.

Each model lives once under COMFYUI_MODELS_PATH at ``<folder>/<filename>``; a destination
that could leave that directory is refused here, naming the entry (symlinks on disk are
checked again where the file is written, see ``services.models.paths``)."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from config.errors import Problem

MODEL_SCHEMES = ("http", "https", "file")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# The names the store writes for itself: a model's ``<file>.part`` and ``<file>.part.json``
# beside it while downloading, and the verified record. A manifest entry with one of these
# names would share a file with the store's own bookkeeping (``x.bin.part`` is x.bin's
# partial download), so such a name is refused.
RECORD_NAME = ".comfy-machine-verified.json"
PART_SUFFIXES = (".part", ".part.json")
SAFE_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# ComfyUI 0.3.64's model folder types, plus the legacy names it still accepts.
KNOWN_FOLDERS = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "clip",
    "diffusion_models",
    "unet",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "t2i_adapter",
    "gligen",
    "upscale_models",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)
# The name ComfyUI lists a legacy folder under (GET /models/{folder}, loader inputs).
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders", "t2i_adapter": "controlnet"}


class ModelEntry(BaseModel):
    """One ``[[models]]`` table of the TOML file."""

    model_config = ConfigDict(extra="forbid")

    url: str
    folder: str
    filename: str | None = None
    size: int | None = Field(None, ge=0)
    sha256: str | None = None
    auth_env: str | None = None
    required: bool = True
    when: Literal["before_start", "background"] = "before_start"


@dataclass(frozen=True)
class ModelSpec:
    """A model to fetch to ``<models_path>/<folder>/<filename>`` and verify."""

    folder: str
    filename: str
    url: str
    size: int | None
    sha256: str | None  # lower case
    auth_env: str | None
    required: bool
    when: str
    source: str  # "models[3]", for error messages

    @property
    def name(self) -> str:
        """The model's key everywhere (health, metrics, errors): ``folder/filename``."""
        return f"{self.folder}/{self.filename}"

    @property
    def verifiable(self) -> bool:
        """The manifest gives a sha256 or a size to check the file against."""
        return self.sha256 is not None or self.size is not None


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment (signed URLs carry secrets there)."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if parsed.port:
        host += f":{parsed.port}"
    return f"{parsed.scheme}://{host}{parsed.path}"


def _filename_from_url(url: str) -> str:
    return unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])


def _check_filename(filename: str) -> str | None:
    """Why ``filename`` cannot be a path inside its folder, or None."""
    if not filename or filename.strip() != filename:
        return "is empty or has surrounding spaces"
    if filename.startswith("/") or "\\" in filename or "\0" in filename:
        return "must be a relative path inside the folder (no leading '/', no '\\')"
    parts = filename.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must stay inside its folder: no '..', '.' or empty path parts"
    for part in parts:
        if part.lower() == RECORD_NAME or part.lower().endswith(PART_SUFFIXES):
            return (
                f"{part!r} is a name the model store uses for itself (a partial download "
                f"'<file>.part' with its '<file>.part.json', or the record {RECORD_NAME}); "
                "set `filename` to another name"
            )
    return None


def build_model_specs(
    entries: list[ModelEntry], where: str = ""
) -> tuple[list[ModelSpec], list[Problem]]:
    """Validate the manifest; one Problem per bad entry, naming it (``models[i].key``)."""
    specs: list[ModelSpec] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(entries):
        source = f"models[{index}]"

        def problem(key: str, given: str, message: str, source: str = source) -> None:
            problems.append(Problem(f"{source}.{key}{where}", given, message))

        parsed = urlparse(entry.url)
        if parsed.scheme not in MODEL_SCHEMES:
            problem(
                "url",
                repr(public_url(entry.url)),
                "scheme must be http, https or file (e.g. https://host/path/model.safetensors)",
            )
            continue
        if parsed.scheme != "file" and not parsed.hostname:
            problem("url", repr(public_url(entry.url)), "has no host")
            continue
        if not SAFE_FOLDER.match(entry.folder):
            problem(
                "folder",
                repr(entry.folder),
                "must be one ComfyUI model folder name, e.g. " + ", ".join(KNOWN_FOLDERS[:6]),
            )
            continue
        filename = entry.filename if entry.filename is not None else _filename_from_url(entry.url)
        why = _check_filename(filename)
        if why:
            problem(
                "filename",
                repr(filename),
                f"{why}; the destination must stay inside COMFYUI_MODELS_PATH/{entry.folder}",
            )
            continue
        filename = posixpath.normpath(filename)
        if entry.sha256 is not None and not SHA256.match(entry.sha256):
            problem("sha256", repr(entry.sha256), "must be 64 hexadecimal characters")
            continue
        if entry.sha256 is not None and entry.sha256.lower() == EMPTY_SHA256:
            problem(
                "sha256",
                repr(entry.sha256),
                "is the sha256 of an empty file; a model is never empty",
            )
            continue
        if entry.size == 0:
            problem("size", "0", "must be the file's size in bytes; a model is never empty")
            continue
        if entry.auth_env is not None and not ENV_NAME.match(entry.auth_env):
            problem(
                "auth_env",
                repr(entry.auth_env),
                "must be the NAME of an environment variable holding the token, e.g. HF_TOKEN",
            )
            continue
        spec = ModelSpec(
            folder=entry.folder,
            filename=filename,
            url=entry.url,
            size=entry.size,
            sha256=entry.sha256.lower() if entry.sha256 else None,
            auth_env=entry.auth_env,
            required=entry.required,
            when=entry.when,
            source=source,
        )
        if spec.name in seen:
            problem(
                "filename",
                repr(filename),
                f"{spec.name} is also the destination of {seen[spec.name]}; give one another "
                "filename",
            )
            continue
        seen[spec.name] = source
        specs.append(spec)
    return specs, problems


def model_specs(models: list[ModelEntry]) -> list[ModelSpec]:
    """The validated specs of settings that already passed ``check_settings``."""
    return build_model_specs(models)[0]
