"""Custom node loading and ``/object_info`` entries, as in ComfyUI's ``nodes.py``/``server.py``.

Every ``custom_nodes/*.py`` file and ``custom_nodes/<dir>/__init__.py`` package is imported
with ``importlib``; its ``NODE_CLASS_MAPPINGS``/``NODE_DISPLAY_NAME_MAPPINGS`` are merged
into the built-in ones (a built-in name is never replaced) and its ``WEB_DIRECTORY`` is
served under ``/extensions/<name>``. A module that raises while importing is logged with
its traceback and ``Cannot import ... module for custom nodes: ...``, contributes
nothing, and is marked ``(IMPORT FAILED)`` in the import-times block.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import traceback
from typing import Any

import model_paths
from nodes import EXTENSION_WEB_DIRS, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


def get_module_name(module_path: str) -> str:
    """``.../custom_nodes/foo.py`` -> ``foo``; ``.../custom_nodes/bar`` -> ``bar``."""
    base = os.path.basename(module_path)
    if os.path.isfile(module_path):
        base = os.path.splitext(base)[0]
    return base


def load_custom_node(
    module_path: str, ignore: set[str], module_parent: str = "custom_nodes"
) -> bool:
    """Import one custom node file or package; True when it registered nodes."""
    module_name = get_module_name(module_path)
    if os.path.isfile(module_path):
        sys_module_name = os.path.splitext(module_path)[0]
        init_file = module_path
        module_dir = os.path.split(module_path)[0]
    else:
        # Like ComfyUI: the package is registered under its path so names cannot clash.
        sys_module_name = module_path.replace(".", "_x_")
        init_file = os.path.join(module_path, "__init__.py")
        module_dir = module_path
    try:
        logging.debug(f"Trying to load custom node {module_path}")
        spec = importlib.util.spec_from_file_location(sys_module_name, init_file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {init_file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[sys_module_name] = module
        spec.loader.exec_module(module)

        web_dir_name = getattr(module, "WEB_DIRECTORY", None)
        if web_dir_name is not None:
            web_dir = os.path.abspath(os.path.join(module_dir, web_dir_name))
            if os.path.isdir(web_dir):
                EXTENSION_WEB_DIRS[module_name] = web_dir

        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is None:
            logging.warning(
                f"Skip {module_path} module for custom nodes due to the lack of "
                "NODE_CLASS_MAPPINGS or NODES_LIST (need one)."
            )
            return False
        for name, node_cls in mappings.items():
            if name not in ignore:
                NODE_CLASS_MAPPINGS[name] = node_cls
                node_cls.RELATIVE_PYTHON_MODULE = f"{module_parent}.{module_name}"
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
        if display is not None:
            NODE_DISPLAY_NAME_MAPPINGS.update(display)
        return True
    except Exception as e:
        logging.warning(traceback.format_exc())
        logging.warning(f"Cannot import {module_path} module for custom nodes: {e}")
        return False


def init_external_custom_nodes(
    disable_all: bool = False, whitelist: list[str] | None = None
) -> None:
    """Load every custom node module found in the ``custom_nodes`` folders and log timings."""
    base_node_names = set(NODE_CLASS_MAPPINGS)
    import_times: list[tuple[float, str, bool]] = []
    for custom_node_path in model_paths.get_folder_paths("custom_nodes"):
        try:
            possible_modules = os.listdir(os.path.realpath(custom_node_path))
        except OSError:
            continue
        for possible_module in sorted(possible_modules):
            if possible_module == "__pycache__" or possible_module.startswith("."):
                continue
            module_path = os.path.join(custom_node_path, possible_module)
            if os.path.isfile(module_path) and os.path.splitext(module_path)[1] != ".py":
                continue
            if module_path.endswith(".disabled"):
                continue
            if disable_all and possible_module not in (whitelist or []):
                logging.info(
                    f"Skipping {possible_module} due to disable_all_custom_nodes and "
                    "whitelist_custom_nodes"
                )
                continue
            started = time.perf_counter()
            ok = load_custom_node(module_path, base_node_names)
            import_times.append((time.perf_counter() - started, module_path, ok))

    if import_times:
        logging.info("\nImport times for custom nodes:")
        for seconds, path, ok in sorted(import_times):
            failed = "" if ok else " (IMPORT FAILED)"
            logging.info(f"{seconds:6.1f} seconds{failed}: {path}")
        logging.info("")


def node_info(node_class: str) -> dict[str, Any]:
    """The ``/object_info`` entry of a node class, built like ComfyUI 0.3.64 does."""
    obj_class = NODE_CLASS_MAPPINGS[node_class]
    if hasattr(obj_class, "GET_NODE_INFO_V1"):
        return obj_class.GET_NODE_INFO_V1()
    input_types = obj_class.INPUT_TYPES()
    info: dict[str, Any] = {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": obj_class.RETURN_TYPES,
    }
    info["output_is_list"] = getattr(
        obj_class, "OUTPUT_IS_LIST", [False] * len(obj_class.RETURN_TYPES)
    )
    info["output_name"] = getattr(obj_class, "RETURN_NAMES", info["output"])
    info["name"] = node_class
    info["display_name"] = NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class)
    info["description"] = getattr(obj_class, "DESCRIPTION", "")
    info["python_module"] = getattr(obj_class, "RELATIVE_PYTHON_MODULE", "nodes")
    info["category"] = getattr(obj_class, "CATEGORY", "sd")
    info["output_node"] = getattr(obj_class, "OUTPUT_NODE", False) is True
    if hasattr(obj_class, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = obj_class.OUTPUT_TOOLTIPS
    if getattr(obj_class, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(obj_class, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(obj_class, "API_NODE"):
        info["api_node"] = obj_class.API_NODE
    return info
