"""Model folders and data directories, after ComfyUI's ``folder_paths`` and ``extra_config``.

State is module-level on purpose, as in ComfyUI: nodes (built-in and custom) look paths up
through these functions. Listings are read from disk on every call (no cache), so a model
file that appears while the server runs is listed by the next request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable

SUPPORTED_PT_EXTENSIONS: frozenset[str] = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)
# Old folder names that ComfyUI still accepts in yaml files and lookups.
LEGACY_NAMES: dict[str, str] = {"unet": "diffusion_models", "clip": "text_encoders"}

# name -> (search paths, allowed extensions); an empty extension set allows every file.
folder_names_and_paths: dict[str, tuple[list[str], frozenset[str]]] = {}

base_path: str = ""
models_dir: str = ""
output_directory: str = ""
input_directory: str = ""
temp_directory: str = ""


def init(base: str) -> None:
    """Register ComfyUI's default folders under ``base`` (its ``--base-directory``)."""
    global base_path, models_dir, output_directory, input_directory, temp_directory
    base_path = base
    models_dir = os.path.join(base, "models")
    output_directory = os.path.join(base, "output")
    input_directory = os.path.join(base, "input")
    temp_directory = os.path.join(base, "temp")

    pt = SUPPORTED_PT_EXTENSIONS
    m = models_dir
    # Same names, order and paths as ComfyUI 0.3.64 (GET /models lists them in this order).
    folder_names_and_paths.clear()
    folder_names_and_paths.update(
        {
            "checkpoints": ([os.path.join(m, "checkpoints")], pt),
            "configs": ([os.path.join(m, "configs")], frozenset({".yaml"})),
            "loras": ([os.path.join(m, "loras")], pt),
            "vae": ([os.path.join(m, "vae")], pt),
            "text_encoders": ([os.path.join(m, "text_encoders"), os.path.join(m, "clip")], pt),
            "diffusion_models": (
                [os.path.join(m, "unet"), os.path.join(m, "diffusion_models")],
                pt,
            ),
            "clip_vision": ([os.path.join(m, "clip_vision")], pt),
            "style_models": ([os.path.join(m, "style_models")], pt),
            "embeddings": ([os.path.join(m, "embeddings")], pt),
            "diffusers": ([os.path.join(m, "diffusers")], frozenset({"folder"})),
            "vae_approx": ([os.path.join(m, "vae_approx")], pt),
            "controlnet": (
                [os.path.join(m, "controlnet"), os.path.join(m, "t2i_adapter")],
                pt,
            ),
            "gligen": ([os.path.join(m, "gligen")], pt),
            "upscale_models": ([os.path.join(m, "upscale_models")], pt),
            "custom_nodes": ([os.path.join(base, "custom_nodes")], frozenset()),
            "hypernetworks": ([os.path.join(m, "hypernetworks")], pt),
            "photomaker": ([os.path.join(m, "photomaker")], pt),
            "classifiers": ([os.path.join(m, "classifiers")], frozenset({""})),
            "model_patches": ([os.path.join(m, "model_patches")], pt),
            "audio_encoders": ([os.path.join(m, "audio_encoders")], pt),
        }
    )


def create_default_model_dirs() -> None:
    """Create the ``models/<folder>`` tree a ComfyUI checkout ships with (best effort)."""
    for paths, _exts in folder_names_and_paths.values():
        for path in paths:
            if path.startswith(models_dir + os.sep):
                # A read-only install still works; listings just come back empty.
                with contextlib.suppress(OSError):
                    os.makedirs(path, exist_ok=True)


def map_legacy(folder_name: str) -> str:
    """Map an old folder name (``unet``, ``clip``) to its current one."""
    return LEGACY_NAMES.get(folder_name, folder_name)


def add_model_folder_path(
    folder_name: str, full_folder_path: str, is_default: bool = False
) -> None:
    """Add a search path to a folder; ``is_default`` puts it first (ComfyUI semantics)."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], frozenset())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    """Return a copy of the search paths of a folder (empty if unknown)."""
    entry = folder_names_and_paths.get(map_legacy(folder_name))
    return list(entry[0]) if entry else []


def load_extra_path_config(yaml_path: str) -> None:
    """Load one ``extra_model_paths.yaml`` like ComfyUI's ``utils.extra_config``.

    Each top-level section has an optional ``base_path`` and ``is_default``; every other key
    is a folder name whose value is one path or a ``|`` block of several, relative to
    ``base_path`` (or to the yaml's directory when there is no ``base_path``).
    """
    import yaml  # Imported here: most runs have no yaml file, and start-up must stay fast.

    with open(yaml_path, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    for section in config or {}:
        conf = config[section]
        if conf is None:
            continue
        section_base: str | None = None
        if "base_path" in conf:
            section_base = os.path.expandvars(os.path.expanduser(conf.pop("base_path")))
            if not os.path.isabs(section_base):
                section_base = os.path.abspath(os.path.join(yaml_dir, section_base))
        is_default = bool(conf.pop("is_default", False))
        for folder in conf:
            for line in str(conf[folder]).split("\n"):
                if not line:
                    continue
                if section_base:
                    full_path = os.path.join(section_base, line)
                elif not os.path.isabs(line):
                    full_path = os.path.abspath(os.path.join(yaml_dir, line))
                else:
                    full_path = line
                normalized = os.path.normpath(full_path)
                logging.info(f"Adding extra search path {folder} {normalized}")
                add_model_folder_path(folder, normalized, is_default)


def _recursive_search(directory: str) -> list[str]:
    """All files under ``directory`` as ``/``-separated relative paths (skipping .git)."""
    if not os.path.isdir(directory):
        return []
    found: list[str] = []
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d != ".git"]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            found.append(rel.replace(os.sep, "/"))
    return found


def _filter_extensions(files: Iterable[str], extensions: frozenset[str]) -> list[str]:
    return sorted(
        f for f in files if not extensions or os.path.splitext(f)[-1].lower() in extensions
    )


def get_filename_list(folder_name: str) -> list[str]:
    """Sorted model files of a folder across all its search paths (read now, not cached)."""
    entry = folder_names_and_paths.get(map_legacy(folder_name))
    if entry is None:
        return []
    paths, extensions = entry
    names: set[str] = set()
    for path in paths:
        names.update(_filter_extensions(_recursive_search(path), extensions))
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Resolve a listed model name to a file path, or None."""
    entry = folder_names_and_paths.get(map_legacy(folder_name))
    if entry is None:
        return None
    # Normalise "a/../b" and strip leading slashes so a name cannot leave the folder.
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for path in entry[0]:
        full_path = os.path.join(path, filename)
        if os.path.isfile(full_path):
            return full_path
        if os.path.islink(full_path):
            logging.warning(f"WARNING path {full_path} exists but doesn't link anywhere, skipping.")
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    """Like :func:`get_full_path` but raises ``FileNotFoundError`` with ComfyUI's message."""
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(
            f"Model in folder '{folder_name}' with filename '{filename}' not found."
        )
    return full_path


def get_output_directory() -> str:
    """The directory SaveImage writes to."""
    return output_directory


def get_input_directory() -> str:
    """The directory uploads go to."""
    return input_directory


def get_temp_directory() -> str:
    """The directory PreviewImage writes to (wiped at start and stop)."""
    return temp_directory


def set_output_directory(path: str) -> None:
    """Set the output directory (``--output-directory``)."""
    global output_directory
    output_directory = path


def set_input_directory(path: str) -> None:
    """Set the input directory (``--input-directory``)."""
    global input_directory
    input_directory = path


def set_temp_directory(path: str) -> None:
    """Set the temp directory (``--temp-directory``)."""
    global temp_directory
    temp_directory = path


def get_directory_by_type(type_name: str) -> str | None:
    """Map ``output``/``input``/``temp`` to its directory, anything else to None."""
    return {"output": output_directory, "input": input_directory, "temp": temp_directory}.get(
        type_name
    )


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """Split ``"file.png [output]"`` style names into the name and the directory it names."""
    for suffix, directory in (
        ("[output]", output_directory),
        ("[input]", input_directory),
        ("[temp]", temp_directory),
    ):
        if name.endswith(suffix):
            return name[: -len(suffix) - 1], directory
    return name, None


def get_save_image_path(
    filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
) -> tuple[str, str, int, str, str]:
    """ComfyUI's naming: ``(folder, filename, counter, subfolder, prefix)`` for a new image.

    The counter continues after the highest ``{prefix}_{NNNNN}_`` file already in the
    folder; the prefix may contain a subfolder (``foo/bar``) and ``%width%``-style fields.
    """

    def map_filename(filename: str) -> tuple[int, str]:
        prefix_len = len(os.path.basename(filename_prefix))
        prefix = filename[: prefix_len + 1]
        try:
            digits = int(filename[prefix_len + 1 :].split("_")[0])
        except ValueError:
            digits = 0
        return digits, prefix

    if "%" in filename_prefix:
        now = time.localtime()
        for key, value in (
            ("%width%", str(image_width)),
            ("%height%", str(image_height)),
            ("%year%", str(now.tm_year)),
            ("%month%", str(now.tm_mon).zfill(2)),
            ("%day%", str(now.tm_mday).zfill(2)),
            ("%hour%", str(now.tm_hour).zfill(2)),
            ("%minute%", str(now.tm_min).zfill(2)),
            ("%second%", str(now.tm_sec).zfill(2)),
        ):
            filename_prefix = filename_prefix.replace(key, value)

    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)

    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        err = (
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}"
        )
        logging.error(err)
        raise Exception(err)

    try:
        counter = (
            max(
                entry
                for entry in map(map_filename, os.listdir(full_output_folder))
                if os.path.normcase(entry[1][:-1]) == os.path.normcase(filename)
                and entry[1][-1:] == "_"
            )[0]
            + 1
        )
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix
