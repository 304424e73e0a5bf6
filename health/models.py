"""/health/comfyui/models: pure, MachineState -> (HTTP status, body). No I/O.

Three sources of reasons, each its own function: the manifest models (verified, unverified,
downloading, missing, failed), each instance's listing of the required models, and the files the
workflows name; ``models_report`` sorts their reasons into failed / starting / degraded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.state import (
    PRESENT_MODEL_STATUSES,
    InstanceState,
    MachineState,
    ModelState,
    ModelStatus,
)


@dataclass
class Reasons:
    """Why the models are not ready, by how bad it is."""

    failed: list[str] = field(default_factory=list)  # 503 failed
    waiting: list[str] = field(default_factory=list)  # 503 starting
    degraded: list[str] = field(default_factory=list)  # 200 degraded

    def extend(self, other: Reasons) -> None:
        self.failed += other.failed
        self.waiting += other.waiting
        self.degraded += other.degraded


def _pct(done: int, total: int | None) -> str:
    if not total:
        return f"{done} bytes"
    return f"{done / 2**20:.0f} of {total / 2**20:.0f} MiB ({100 * done / total:.0f}%)"


def _unverified_note(model: ModelState) -> str:
    return (
        f"model {model.name} is unverified: the manifest gives neither sha256 nor size, so "
        "only the server's framing said the file is whole; pin it with sha256 = "
        f'"{model.verified_sha256}"'
    )


def model_body(model: ModelState, now: float) -> dict[str, Any]:
    rate = model.rate_bps(now)
    remaining = (model.bytes_total - model.bytes_done) if model.bytes_total is not None else None
    return {
        "name": model.name,
        "folder": model.folder,
        "filename": model.filename,
        "url": model.url,
        "path": model.path,
        "required": model.required,
        "when": model.when,
        "status": model.status,
        "size": model.size,
        "sha256": model.sha256,
        "verified_sha256": model.verified_sha256,
        "bytes_done": model.bytes_done,
        "bytes_total": model.bytes_total,
        "rate_bytes_per_s": round(rate, 1) if rate is not None else None,
        "eta_s": round(remaining / rate, 1) if rate and remaining is not None else None,
        "error": model.error,
        # Present and usable, but nothing checked it: said here, never hidden as verified.
        "warning": _unverified_note(model) if model.status == ModelStatus.UNVERIFIED else None,
    }


def _checked(inst: InstanceState) -> bool:
    return inst.pid is not None and inst.model_check_pid == inst.pid


def _progress(models: list[dict[str, Any]]) -> dict[str, Any]:
    done = sum(m["bytes_done"] for m in models)
    total = (
        None
        if any(m["bytes_total"] is None for m in models)
        else sum(m["bytes_total"] for m in models)
    )
    rate = sum(m["rate_bytes_per_s"] or 0 for m in models if m["status"] == ModelStatus.DOWNLOADING)
    return {
        "bytes_done": done,
        "bytes_total": total,
        "rate_bytes_per_s": round(rate, 1) if rate else None,
        "eta_s": round((total - done) / rate, 1) if rate and total is not None else None,
    }


def _model_reasons(models: list[dict[str, Any]]) -> Reasons:
    """A failed required model fails, a failed optional one degrades, a required one not on
    disk yet is waited for. An unverified one is present: it does not hold readiness back (its
    entry and ``warnings`` say it is unverified)."""
    reasons = Reasons()
    for m in models:
        if m["status"] in PRESENT_MODEL_STATUSES:
            continue
        if m["status"] == ModelStatus.FAILED:
            (reasons.failed if m["required"] else reasons.degraded).append(
                f"{'required' if m['required'] else 'optional'} model {m['name']} failed: "
                f"{m['error']}"
            )
        elif m["required"]:
            what = (
                "is downloading: " + _pct(m["bytes_done"], m["bytes_total"])
                if m["status"] == ModelStatus.DOWNLOADING
                else "is not fetched yet"
            )
            reasons.waiting.append(f"required model {m['name']} {what} ({m['when']})")
    return reasons


def _instance_entries(state: MachineState) -> tuple[list[dict[str, Any]], Reasons]:
    """Each instance that must list the models: what its last check of this process found."""
    instances = []
    reasons = Reasons()
    for _, inst in sorted(state.instances.items()):
        if not inst.model_check_needed:
            continue
        checked = _checked(inst)
        instances.append(
            {
                "gpu": inst.plan.gpu,
                "name": inst.plan.name,
                "checked": checked,
                "mismatches": inst.model_mismatches if checked else [],
                "workflow_missing": [asdict(r) for r in inst.workflow_missing] if checked else [],
            }
        )
        if checked:
            reasons.failed += inst.model_mismatches
        elif inst.pid is not None:
            reasons.waiting.append(f"{inst.plan.name}: its model listing is not checked yet")
    return instances, reasons


def _workflow_entries(
    state: MachineState, checked_names: list[str]
) -> tuple[list[dict[str, Any]], Reasons]:
    """Each file a workflow names: which checked instances list it. Listed by none fails (a
    job would hit value_not_in_list), by some degrades."""
    refs = []
    reasons = Reasons()
    for ref in state.workflow_refs:
        missing_on = [
            inst.plan.name
            for _, inst in sorted(state.instances.items())
            if _checked(inst) and ref in inst.workflow_missing
        ]
        refs.append(
            {
                **asdict(ref),
                "missing_on": missing_on,
                "listed_by": [n for n in checked_names if n not in missing_on],
            }
        )
        where = (
            f"workflow {ref.workflow} node {ref.node} ({ref.class_type}) input "
            f"{ref.input}: {ref.file!r}"
        )
        if checked_names and len(missing_on) == len(checked_names):
            reasons.failed.append(
                f"{where} is not listed by any instance; a job with this workflow "
                "would fail with value_not_in_list"
            )
        elif missing_on:
            reasons.degraded.append(f"{where} is not listed by {', '.join(missing_on)}")
    return refs, reasons


def models_report(state: MachineState, now: float, phase: str) -> tuple[int, dict[str, Any]]:
    """200 when every required model is present (verified, or unverified when the manifest
    gives nothing to check) and every instance that must lists it (and
    what the workflows name); 503 with the reasons otherwise. ``phase`` is the node's reported
    phase (checks.reported_phase)."""
    models = [model_body(m, now) for m in state.models.values()]
    reasons = _model_reasons(models)
    instances, instance_reasons = _instance_entries(state)
    reasons.extend(instance_reasons)
    checked_names = [i["name"] for i in instances if i["checked"]]
    refs, workflow_reasons = _workflow_entries(state, checked_names)
    reasons.extend(workflow_reasons)
    reasons.failed += state.workflow_errors
    extra = {
        "configured": state.models_configured,
        "models": models,
        "progress": _progress(models),
        "instances": instances,
        "workflows": refs,
        "download_bytes_total": state.download_bytes_total,
        "warnings": [m["warning"] for m in models if m["warning"]],
    }
    if not state.models_configured and not models:
        extra["message"] = "no model manifest is configured; nothing to fetch or verify"
    return _verdict(reasons, {"phase": phase}, extra)


def _verdict(
    reasons: Reasons, body: dict[str, Any], extra: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    failed, waiting, degraded = reasons.failed, reasons.waiting, reasons.degraded
    if failed:
        return 503, {"status": "failed", **body, "reasons": failed + waiting + degraded, **extra}
    if waiting:
        return 503, {"status": "starting", **body, "reasons": waiting + degraded, **extra}
    if degraded:
        return 200, {"status": "degraded", **body, "reasons": degraded, **extra}
    return 200, {"status": "ready", **body, "reasons": [], **extra}
