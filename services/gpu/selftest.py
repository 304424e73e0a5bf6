"""Run the sentinel self-test (selftest_script.py) with an instance's Python and environment,
and cache a pass per GPU UUID and driver version so a warm reboot does not repeat it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.process_group import end_group_async, start_in_group

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("selftest_script.py")


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    report: dict[str, Any]
    cached: bool = False

    @property
    def reason(self) -> str:
        error = self.report.get("error") or "failed"
        return f"sentinel self-test failed: {error}"


def cache_path(cache_dir: Path, uuid: str, driver: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{uuid}-{driver}")
    return cache_dir / f"{safe}.json"


def cached_pass(cache_dir: Path, uuid: str, driver: str, max_age_s: float) -> dict | None:
    """A passing report younger than ``max_age_s`` for this GPU and driver, else None."""
    if max_age_s <= 0:
        return None
    try:
        report = json.loads(cache_path(cache_dir, uuid, driver).read_text())
    except (OSError, ValueError):
        return None
    fresh = time.time() - float(report.get("finished_at", 0)) < max_age_s
    return report if report.get("ok") and fresh else None


def store(cache_dir: Path, uuid: str, driver: str, report: dict) -> None:
    """Cache a pass; a cache that cannot be written (a full disk) only means a retest."""
    path = cache_path(cache_dir, uuid, driver)
    tmp = path.with_suffix(".tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report))
        tmp.replace(path)
    except OSError as exc:
        log.warning("self-test pass not cached", extra={"fields": {"path": str(path),
                                                                  "error": str(exc)}})
        tmp.unlink(missing_ok=True)


async def run_selftest(
    python: Path | str,
    env: dict[str, str],
    device: str,
    limit_s: float,
    size: str = "full",
    inject_fault: float = 0.0,
    threads: int = 0,
) -> SelfTestResult:
    """Run the script once; never raises for a failing or hanging test (the result says why)."""
    argv = [str(python), str(SCRIPT), "--device", device, "--size", size]
    if inject_fault:
        argv += ["--inject-fault", str(inject_fault)]
    if threads:
        argv += ["--threads", str(threads)]
    started = time.time()
    if shutil.which(str(python)) is None:
        return SelfTestResult(False, {"ok": False, "error": f"cannot run {python}: not found"})
    try:
        # In its own process group, ended whole on the timeout, on a cancel and when the agent
        # dies (even by SIGKILL): a hung test leaves nothing holding the GPU.
        proc = await start_in_group(
            argv,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return SelfTestResult(False, {"ok": False, "error": f"cannot run {python}: {exc}"})
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate()
    except asyncio.CancelledError:  # the node is stopping: the test must not outlive it
        await asyncio.shield(end_group_async(proc))
        raise
    except TimeoutError:
        await end_group_async(proc)
        return SelfTestResult(
            False,
            {
                "ok": False,
                "error": f"did not finish within {limit_s:.0f}s "
                "(GPU_SELFTEST_TIMEOUT); a hung kernel is a failing GPU",
            },
        )
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        report = {"ok": False, "error": f"exited {proc.returncode} without a report: {tail}"}
    report["started_at"], report["finished_at"] = started, time.time()
    return SelfTestResult(bool(report.get("ok")) and proc.returncode == 0, report)
