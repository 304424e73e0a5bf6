"""The sentinel self-test on the CPU: passes on a sound device, catches unwritten elements,
caches a pass per GPU UUID and driver; `comfy-machine gpu-test` runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.gpu.selftest import SCRIPT, cached_pass, run_selftest, store

# Not imported here: torch warns at import (no numpy) and the suite turns warnings into errors.
HAVE_TORCH = importlib.util.find_spec("torch") is not None

needs_torch = pytest.mark.skipif(
    not HAVE_TORCH,
    reason="torch is not installed in this venv: .venv/bin/pip install torch "
    "(a CPU build is enough; .ci/run installs the machine's CPU wheel)",
)


@needs_torch
async def test_selftest_passes_on_the_cpu() -> None:
    result = await run_selftest(sys.executable, {}, "cpu", 60, size="small")
    assert result.ok, result.report
    checks = result.report["checks"]
    assert {(c["op"], c["dtype"]) for c in checks} == {
        (op, dt)
        for op in ("mul", "matmul", "linear", "sdpa")
        for dt in ("float32", "float16", "bfloat16")
    }
    assert all(c["bad"] == 0 and c["nan"] == 0 for c in checks)
    assert result.report["duration_s"] < 10


@needs_torch
async def test_selftest_catches_elements_left_unwritten() -> None:
    # 0.06% of the elements never written, as on the broken RTX 4090.
    result = await run_selftest(sys.executable, {}, "cpu", 60, size="small", inject_fault=0.0006)
    assert not result.ok
    mul = next(c for c in result.report["checks"] if c["op"] == "mul" and c["dtype"] == "float32")
    assert mul["shape"] == [65536] and mul["bad"] == 39
    assert result.reason.startswith(
        "sentinel self-test failed: mul float32 (65536,): 39 bad element(s) (0 NaN, 0 Inf)"
    )


async def test_selftest_without_a_usable_python_is_a_failure(tmp_path: Path) -> None:
    result = await run_selftest(tmp_path / "no-python", {}, "cpu", 10)
    assert not result.ok and "cannot run" in result.reason


@needs_torch
async def test_selftest_on_a_gpu_torch_cannot_see() -> None:
    result = await run_selftest(sys.executable, {"CUDA_VISIBLE_DEVICES": ""}, "cuda", 60)
    assert not result.ok and "torch.cuda" in result.reason


def test_cache_keeps_passes_per_uuid_and_driver(tmp_path: Path) -> None:
    report = {"ok": True, "finished_at": time.time()}
    store(tmp_path, "GPU-a", "550.1", report)
    assert cached_pass(tmp_path, "GPU-a", "550.1", 3600) == report
    assert cached_pass(tmp_path, "GPU-a", "555.0", 3600) is None  # another driver: test again
    assert cached_pass(tmp_path, "GPU-b", "550.1", 3600) is None
    assert cached_pass(tmp_path, "GPU-a", "550.1", 0) is None  # caching off
    store(tmp_path, "GPU-a", "550.1", {"ok": True, "finished_at": time.time() - 7200})
    assert cached_pass(tmp_path, "GPU-a", "550.1", 3600) is None  # too old


@needs_torch
def test_gpu_test_command_in_cpu_mode(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "COMFYUI_CPU_ONLY": "true",
        "NUM_GPUS": "1",
        "MACHINE_WORKSPACE": str(tmp_path),
        "COMFYUI_PYTHON": sys.executable,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "machine", "gpu-test", "--gpu", "0", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (report,) = json.loads(proc.stdout)
    assert report["gpu"] == 0 and report["ok"] and report["device"] == "cpu"


@needs_torch
async def test_a_pass_is_cached_per_gpu_and_driver(tmp_path: Path) -> None:
    from config.settings import load_settings
    from services.gpu.guard import selftest_instance
    from services.plan import make_plan
    from services.state import InstanceState

    settings = load_settings(
        {
            "COMFYUI_CPU_ONLY": "true",
            "MACHINE_WORKSPACE": str(tmp_path),
            "COMFYUI_PYTHON": sys.executable,
        }
    )
    plan = make_plan(settings, [])
    inst = InstanceState(plan=plan.instances[0])
    first = await selftest_instance(settings, plan, inst, "550.1")
    assert first.ok and not first.cached
    again = await selftest_instance(settings, plan, inst, "550.1")
    assert again.ok and again.cached and again.report["finished_at"] == first.report["finished_at"]
    other_driver = await selftest_instance(settings, plan, inst, "555.2")
    assert other_driver.ok and not other_driver.cached


def test_the_script_starts_without_torch_and_shadows_no_standard_module() -> None:
    # The script runs with its own directory first on sys.path: a sibling named like a
    # standard-library module (types.py, say) would break its very first import.
    siblings = {p.stem for p in SCRIPT.parent.glob("*.py")} | {
        p.name for p in SCRIPT.parent.iterdir() if p.is_dir()
    }
    assert not siblings & sys.stdlib_module_names
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--device", "cpu"],  # -S: no site-packages, no torch
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 2 and "torch cannot be imported" in report["error"], proc.stderr
