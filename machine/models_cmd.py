"""`comfy-machine models`: fetch and verify the whole manifest (both ``when`` kinds), with a
progress line on a terminal and JSON lines elsewhere; exit 1 naming every required failure."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TextIO

from config.settings import Settings
from health.models import model_body
from services.models.extra_paths import render_extra_model_paths, write_extra_model_paths
from services.models.step import make_fetcher
from services.state import MachineState, ModelStatus

REDRAW_S = 0.5
FINISHED = (ModelStatus.VERIFIED, ModelStatus.UNVERIFIED, ModelStatus.FAILED)


def _mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def progress_line(state: MachineState, now: float) -> str:
    models = [model_body(m, now) for m in state.models.values()]
    done = sum(m["bytes_done"] for m in models)
    total = (
        None
        if any(m["bytes_total"] is None for m in models)
        else sum(m["bytes_total"] for m in models)
    )
    rate = sum(m["rate_bytes_per_s"] or 0 for m in models)
    verified = sum(1 for m in models if m["status"] == ModelStatus.VERIFIED)
    eta = f", ETA {(total - done) / rate:.0f}s" if rate and total is not None else ""
    current = [m["name"] for m in models if m["status"] == ModelStatus.DOWNLOADING]
    line = (
        f"models: {verified}/{len(models)} verified, {_mib(done)} of {_mib(total)}"
        f"{f', {_mib(rate)}/s' if rate else ''}{eta}"
    )
    return line + (f" - {', '.join(current)}" if current else "")


class ModelLines:
    """Off a terminal: one JSON line per model when it ends verified or failed, once each,
    however often it is asked (while fetching and once more at the end)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._reported: set[str] = set()

    def print_finished(self, state: MachineState, now: float) -> None:
        for model in state.models.values():
            if model.status in FINISHED and model.name not in self._reported:
                self._reported.add(model.name)
                entry = {"ts": round(now, 3), "event": "model", **model_body(model, now)}
                print(json.dumps(entry), file=self._stream, flush=True)


async def _draw(state: MachineState, stream: TextIO, lines: ModelLines | None) -> None:
    """Until cancelled: redraw the progress line (terminal) or print finished models."""
    while True:
        now = time.time()
        if lines is None:
            print("\r\033[K" + progress_line(state, now), end="", file=stream, flush=True)
        else:
            lines.print_finished(state, now)
        await state.wait_changed(REDRAW_S)


async def _run(settings: Settings, stream: TextIO) -> int:
    state = MachineState()
    yaml_path = settings.machine_workspace / "run" / "extra_model_paths.yaml"
    text = render_extra_model_paths(settings.models_path, (m.folder for m in settings.models))
    write_extra_model_paths(yaml_path, text, settings.models_path)
    fetcher = make_fetcher(settings, state)
    lines = None if stream.isatty() else ModelLines(stream)
    drawer = asyncio.create_task(_draw(state, stream, lines))
    try:
        failed = await fetcher.run()
    finally:
        drawer.cancel()
        await asyncio.gather(drawer, return_exceptions=True)
    if lines is None:
        print("\r\033[K" + progress_line(state, time.time()), file=stream, flush=True)
    else:
        lines.print_finished(state, time.time())  # those that finished since the last draw
    code = 0
    for model in failed:
        kind = "required" if model.required else "optional"
        print(f"comfy-machine: {kind} model {model.name} failed: {model.error}", file=sys.stderr)
        code = 1 if model.required else code
    for error in state.workflow_errors:
        print(f"comfy-machine: {error}", file=sys.stderr)
        code = 1
    if code == 0:
        verified = sum(1 for m in state.models.values() if m.status == ModelStatus.VERIFIED)
        unverified = sum(1 for m in state.models.values() if m.status == ModelStatus.UNVERIFIED)
        note = f", {unverified} unverified (no sha256 or size to check)" if unverified else ""
        print(
            f"{verified} model(s) verified{note} in {settings.models_path}; "
            f"extra_model_paths.yaml: {yaml_path}",
            file=stream,
        )
    return code


def run_models(settings: Settings, stream: TextIO = sys.stdout) -> int:
    """Exit code: 0 when every required model is verified, 1 naming each failure."""
    return asyncio.run(_run(settings, stream))
