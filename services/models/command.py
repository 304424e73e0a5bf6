"""`comfy-machine models`: fetch and verify the whole manifest (both ``when`` kinds), with a
progress line on a terminal and JSON lines elsewhere; exit 1 naming every required failure."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TextIO

from config.settings import Settings
from services.models.extra_paths import render_extra_model_paths, write_extra_model_paths
from services.models.report import model_body
from services.models.step import make_fetcher
from services.state import MachineState

REDRAW_S = 0.5


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
    verified = sum(1 for m in models if m["status"] == "verified")
    eta = f", ETA {(total - done) / rate:.0f}s" if rate and total is not None else ""
    current = [m["name"] for m in models if m["status"] == "downloading"]
    line = (
        f"models: {verified}/{len(models)} verified, {_mib(done)} of {_mib(total)}"
        f"{f', {_mib(rate)}/s' if rate else ''}{eta}"
    )
    return line + (f" - {', '.join(current)}" if current else "")


async def _draw(state: MachineState, stream: TextIO, tty: bool) -> None:
    reported: set[str] = set()
    while True:
        now = time.time()
        if tty:
            print("\r\033[K" + progress_line(state, now), end="", file=stream, flush=True)
        else:
            for model in state.models.values():
                if model.status in ("verified", "failed") and model.name not in reported:
                    reported.add(model.name)
                    print(
                        json.dumps(
                            {"ts": round(now, 3), "event": "model", **model_body(model, now)}
                        ),
                        file=stream,
                        flush=True,
                    )
        await state.wait_changed(REDRAW_S)


async def _run(settings: Settings, stream: TextIO) -> int:
    state = MachineState()
    yaml_path = settings.machine_workspace / "run" / "extra_model_paths.yaml"
    text = render_extra_model_paths(settings.models_path, (m.folder for m in settings.models))
    write_extra_model_paths(yaml_path, text, settings.models_path)
    fetcher = make_fetcher(settings, state)
    tty = stream.isatty()
    drawer = asyncio.create_task(_draw(state, stream, tty))
    try:
        failed = await fetcher.run()
    finally:
        drawer.cancel()
        await asyncio.gather(drawer, return_exceptions=True)
    if tty:
        print("\r\033[K" + progress_line(state, time.time()), file=stream, flush=True)
    else:
        await _draw_once(state, stream)
    code = 0
    for model in failed:
        kind = "required" if model.required else "optional"
        print(f"comfy-machine: {kind} model {model.name} failed: {model.error}", file=sys.stderr)
        code = 1 if model.required else code
    for error in state.workflow_errors:
        print(f"comfy-machine: {error}", file=sys.stderr)
        code = 1
    if code == 0:
        verified = sum(1 for m in state.models.values() if m.status == "verified")
        print(
            f"{verified} model(s) verified in {settings.models_path}; "
            f"extra_model_paths.yaml: {yaml_path}",
            file=stream,
        )
    return code


async def _draw_once(state: MachineState, stream: TextIO) -> None:
    task = asyncio.create_task(_draw(state, stream, False))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def run_models(settings: Settings, stream: TextIO = sys.stdout) -> int:
    """Exit code: 0 when every required model is verified, 1 naming each failure."""
    return asyncio.run(_run(settings, stream))
