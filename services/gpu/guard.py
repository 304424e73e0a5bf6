"""Wiring for the boot: which NVML, which policy, the self-test of every planned GPU."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from config.settings import Settings
from services.gpu.adapters import nvml_for
from services.gpu.fake import FakeNvml
from services.gpu.policy import GpuPolicy
from services.gpu.sampler import GpuSampler
from services.gpu.selftest import SelfTestResult, cached_pass, run_selftest, store
from services.plan import NodePlan
from services.state import GpuStatus, InstanceState, MachineState

log = logging.getLogger(__name__)


def policy_from(settings: Settings) -> GpuPolicy:
    return GpuPolicy(
        max_temperature_celsius=settings.gpu_max_temperature_celsius,
        max_ecc_uncorrected=settings.gpu_max_ecc_uncorrected,
        ignored_xids=tuple(settings.gpu_ignored_xids),
        unhealthy_samples=settings.gpu_unhealthy_samples,
    )


def selftest_cache_dir(plan: NodePlan) -> Path:
    return plan.run_dir / "gpu-selftest"


def selftest_device(plan: NodePlan, fake_nvml: Path | None = None) -> tuple[str, str]:
    """(torch device, size): the instance's GPU, or a short run on the CPU in CPU mode and for
    fake GPUs that compute on the CPU (MACHINE_FAKE_NVML with "compute_on_cpu")."""
    if plan.cpu_only or (fake_nvml is not None and FakeNvml.from_file(fake_nvml).compute_on_cpu):
        return "cpu", "small"
    return "cuda", "full"


async def selftest_instance(
    settings: Settings,
    plan: NodePlan,
    inst: InstanceState,
    driver: str,
    use_cache: bool = True,
    parallel: int = 1,
) -> SelfTestResult:
    """Self-test one instance's GPU with the instance's Python and environment; cache a pass."""
    cache_dir = selftest_cache_dir(plan)
    uuid = inst.plan.gpu_uuid
    max_age = settings.gpu_selftest_cache_hours * 3600
    if use_cache and (report := cached_pass(cache_dir, uuid, driver, max_age)) is not None:
        return SelfTestResult(True, report, cached=True)
    device, size = selftest_device(plan, settings.machine_fake_nvml)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else 0
    result = await run_selftest(
        settings.python, inst.plan.env, device, settings.gpu_selftest_timeout, size, threads=threads
    )
    if result.ok:
        store(cache_dir, uuid, driver, result.report)
    return result


async def selftest_all(settings: Settings, plan: NodePlan, state: MachineState) -> None:
    """Self-test every planned GPU (in parallel); a failing GPU is quarantined before start."""

    async def one(inst: InstanceState) -> None:
        status: GpuStatus | None = next(
            (g for g in state.gpus.values() if g.uuid == inst.plan.gpu_uuid), None
        )
        driver = status.driver_version if status else "cpu"
        result = await selftest_instance(
            settings, plan, inst, driver, parallel=len(state.instances)
        )
        log.log(
            logging.INFO if result.ok else logging.ERROR,
            "GPU self-test",
            extra={
                "fields": {
                    "instance": inst.plan.name,
                    "gpu_uuid": inst.plan.gpu_uuid,
                    "ok": result.ok,
                    "cached": result.cached,
                    "duration_s": result.report.get("duration_s"),
                    "error": result.report.get("error"),
                }
            },
        )
        if status is not None:
            status.selftest = {**result.report, "cached": result.cached}
        if not result.ok:
            reason = f"GPU {inst.plan.gpu_uuid} quarantined: {result.reason}"
            inst.quarantined = reason
            if status is not None:
                status.quarantined, status.quarantine_reason = True, result.reason
        state.changed()

    await asyncio.gather(*(one(inst) for inst in state.instances.values()))


async def prepare_gpus(
    settings: Settings, plan: NodePlan, state: MachineState
) -> GpuSampler | None:
    """Before instances start (GPU mode): open NVML, self-test. None in CPU mode."""
    if plan.cpu_only or not plan.instances:
        return None
    sampler = GpuSampler(
        nvml_for(settings), state, policy_from(settings), settings.gpu_sample_interval
    )
    await sampler.open()
    if settings.gpu_selftest:
        await selftest_all(settings, plan, state)
    return sampler
