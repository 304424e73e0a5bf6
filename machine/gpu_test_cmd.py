"""`comfy-machine gpu-test [--gpu N]`: the sentinel self-test on demand, with each instance's
own Python and environment (CUDA_VISIBLE_DEVICES=<UUID>); the CPU in CPU mode."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

from config.errors import ConfigError, Problem
from config.settings import Settings
from services.gpu.guard import nvml_for, selftest_instance
from services.gpu.selftest import SelfTestResult
from services.plan import NodePlan
from services.state import InstanceState


def _driver(settings: Settings, plan: NodePlan) -> str:
    if plan.cpu_only:
        return "cpu"
    nvml = nvml_for(settings)
    try:
        return nvml.open().driver_version
    finally:
        nvml.close()


def run_gpu_test(
    settings: Settings,
    plan: NodePlan,
    gpu: int | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Test the chosen instance's GPU (all when ``gpu`` is None); 0 when every one passed."""
    chosen = [i for i in plan.instances if gpu is None or i.gpu == gpu]
    if not chosen:
        planned = ", ".join(str(i.gpu) for i in plan.instances) or "none"
        raise ConfigError(
            [Problem("--gpu", str(gpu), f"no instance on that GPU; planned GPUs: {planned}")]
        )
    driver = _driver(settings, plan)

    async def main() -> list[tuple[int, SelfTestResult]]:
        results = []
        for inst in chosen:  # one after another: a per-GPU time is what operators compare
            result = await selftest_instance(
                settings, plan, InstanceState(plan=inst), driver, use_cache=False
            )
            results.append((inst.gpu, result))
        return results

    results = asyncio.run(main())
    ok = all(r.ok for _, r in results)
    if as_json:
        print(json.dumps([{"gpu": g, **r.report} for g, r in results]), file=out)
        return 0 if ok else 1
    for g, r in results:
        report = r.report
        inst = plan.instance(g)
        assert inst is not None
        head = "PASS" if r.ok else "FAIL"
        print(
            f"GPU {g} {inst.gpu_uuid} ({report.get('device_name', inst.gpu_name)}): {head} in "
            f"{report.get('duration_s', '?')} s, driver {driver}, torch {report.get('torch', '?')}",
            file=out,
        )
        for check in report.get("checks", []):
            print(
                f"  {check['op']:<7} {check['dtype']:<9} {tuple(check['shape'])!s:<20} "
                f"bad={check['bad']} nan={check['nan']} inf={check['inf']} "
                f"max_abs_err={check['max_abs_err']}",
                file=out,
            )
        if report.get("error"):
            print(f"  error: {report['error']}", file=out)
    return 0 if ok else 1
