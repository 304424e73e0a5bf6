"""Ask one instance whether it lists what is needed: each verified required model under
``GET /models/{folder}``, each workflow file in its loader's ``/object_info`` choices.

This is the check nothing else makes: a file in the wrong folder is on disk and verified,
yet ComfyUI answers ``value_not_in_list`` for it. Results go into the InstanceState."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from config.models import LEGACY_FOLDERS
from services.comfyui import ComfyApiError, ComfyClient
from services.models.workflows import WorkflowRef
from services.state import InstanceState, MachineState

log = logging.getLogger(__name__)


def needs_check(state: MachineState) -> bool:
    """Whether instances must pass the model check to be ready."""
    return any(m.required for m in state.models.values()) or bool(state.workflow_refs)


def combo_choices(info: dict[str, Any], name: str) -> list[str] | None:
    """The allowed values of input ``name`` when it is a list (COMBO), else None."""
    inputs = info.get("input") or {}
    for group in ("required", "optional"):
        spec = (inputs.get(group) or {}).get(name)
        if isinstance(spec, list | tuple) and spec:
            first = spec[0]
            if isinstance(first, list):
                return [str(v) for v in first]
            if first == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
                return [str(v) for v in spec[1].get("options", [])]
            return None
    return None


async def check_instance(
    state: MachineState, inst: InstanceState, client: ComfyClient, alive: Callable[[], bool]
) -> None:
    """One complete check of ``inst`` (skipped when nothing changed since the last one)."""
    if not inst.model_check_needed:
        return
    generation = state.models_generation
    if (
        inst.model_check_pid == inst.pid
        and inst.model_check_generation == generation
        and not inst.model_mismatches
        and not inst.workflow_missing
    ):
        return  # a mismatch is checked again at every probe: moving the file fixes it
    pid = inst.pid
    try:
        mismatches = await _required_models(state, inst, client)
        missing = await _workflow_refs(state, client)
    except (aiohttp.ClientError, TimeoutError, ComfyApiError, ValueError) as exc:
        log.warning(
            "model check failed",
            extra={"fields": {"instance": inst.plan.name, "error": f"{type(exc).__name__}: {exc}"}},
        )
        return  # retried after the next probe; the instance stays not ready meanwhile
    if not alive() or inst.pid != pid:
        return
    previous = inst.model_mismatches if inst.model_check_pid == pid else []
    changed = (mismatches, missing) != (inst.model_mismatches, inst.workflow_missing) or (
        inst.model_check_pid != pid or inst.model_check_generation != generation
    )
    inst.model_mismatches, inst.workflow_missing = mismatches, missing
    inst.model_check_pid, inst.model_check_generation = pid, generation
    if changed:
        state.changed()
    for text in (t for t in mismatches if t not in previous):
        log.error(
            "instance does not list a required model",
            extra={"fields": {"instance": inst.plan.name, "problem": text}},
        )


async def _required_models(
    state: MachineState, inst: InstanceState, client: ComfyClient
) -> list[str]:
    wanted = [m for m in state.models.values() if m.required and m.present]
    listings: dict[str, list[str] | None] = {}
    problems = []
    for model in wanted:
        folder = LEGACY_FOLDERS.get(model.folder, model.folder)
        if folder not in listings:
            listings[folder] = await client.models(folder)
        listed = listings[folder]
        if listed is None:
            problems.append(
                f"{inst.plan.name} has no model folder {folder!r} (GET /models/{folder} is 404), "
                f"so it cannot load {model.name}; use a ComfyUI folder type in the manifest"
            )
        elif model.filename not in listed:
            shown = ", ".join(listed[:5]) + (", ..." if len(listed) > 5 else "") or "nothing"
            problems.append(
                f"{inst.plan.name} does not list {model.filename!r} under {folder} (it lists "
                f"{shown}) although {model.path} is verified; is the file in the wrong folder, "
                "or was extra_model_paths.yaml not loaded?"
            )
    return problems


async def _workflow_refs(state: MachineState, client: ComfyClient) -> list[WorkflowRef]:
    infos: dict[str, dict[str, Any]] = {}
    missing = []
    for ref in state.workflow_refs:
        if ref.class_type not in infos:
            infos[ref.class_type] = await client.node_info(ref.class_type)
        info = infos[ref.class_type]
        if not info:
            missing.append(ref)  # the node type itself is not available here
            continue
        choices = combo_choices(info, ref.input)
        if choices is not None and ref.file not in choices:
            missing.append(ref)
    return missing
