"""/health/comfyui/models: pure, MachineState -> (HTTP status, body). No I/O.

Lives next to the model code so that health/checks.py only delegates to it."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from services.state import InstanceState, MachineState, ModelState


def _pct(done: int, total: int | None) -> str:
    if not total:
        return f"{done} bytes"
    return f"{done / 2**20:.0f} of {total / 2**20:.0f} MiB ({100 * done / total:.0f}%)"


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
    rate = sum(m["rate_bytes_per_s"] or 0 for m in models if m["status"] == "downloading")
    return {
        "bytes_done": done,
        "bytes_total": total,
        "rate_bytes_per_s": round(rate, 1) if rate else None,
        "eta_s": round((total - done) / rate, 1) if rate and total is not None else None,
    }


def models_report(state: MachineState, now: float) -> tuple[int, dict[str, Any]]:
    """200 when every required model is verified and every instance that must lists it (and
    what the workflows name); 503 with the reasons otherwise."""
    models = [model_body(m, now) for m in state.models.values()]
    failed: list[str] = []
    waiting: list[str] = []
    degraded: list[str] = []
    for m in models:
        if m["status"] == "verified":
            continue
        if m["status"] == "failed":
            (failed if m["required"] else degraded).append(
                f"{'required' if m['required'] else 'optional'} model {m['name']} failed: "
                f"{m['error']}"
            )
        elif m["required"]:
            what = (
                "is downloading: " + _pct(m["bytes_done"], m["bytes_total"])
                if m["status"] == "downloading"
                else "is not fetched yet"
            )
            waiting.append(f"required model {m['name']} {what} ({m['when']})")
    instances = []
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
            failed += inst.model_mismatches
        elif inst.pid is not None:
            waiting.append(f"{inst.plan.name}: its model listing is not checked yet")
    checked_names = [i["name"] for i in instances if i["checked"]]
    refs = []
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
            failed.append(
                f"{where} is not listed by any instance; a job with this workflow "
                "would fail with value_not_in_list"
            )
        elif missing_on:
            degraded.append(f"{where} is not listed by {', '.join(missing_on)}")
    failed += state.workflow_errors
    extra = {
        "configured": state.models_configured,
        "models": models,
        "progress": _progress(models),
        "instances": instances,
        "workflows": refs,
        "download_bytes_total": state.download_bytes_total,
    }
    if not state.models_configured and not models:
        extra["message"] = "no model manifest is configured; nothing to fetch or verify"
    body = {"phase": str(state.phase)}
    if failed:
        return 503, {"status": "failed", **body, "reasons": failed + waiting + degraded, **extra}
    if waiting:
        return 503, {"status": "starting", **body, "reasons": waiting + degraded, **extra}
    if degraded:
        return 200, {"status": "degraded", **body, "reasons": degraded, **extra}
    return 200, {"status": "ready", **body, "reasons": [], **extra}
