"""The GPU sampler: NVML read off the event loop every few seconds into MachineState.gpus,
judged by the policy; an unhealthy GPU is handed to ``quarantine`` (which stops its instance)
at once for a fault of record, after GPU_UNHEALTHY_SAMPLES samples in a row for a hot or
unanswered one (``policy.debounce``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from config.errors import GpuError
from services.gpu.interface import GpuSample, Inventory, Nvml, XidEvent
from services.gpu.policy import GpuPolicy, debounce, evaluate
from services.state import GpuStatus, MachineState

log = logging.getLogger(__name__)

Quarantine = Callable[[str, str], Awaitable[None]]  # (GPU UUID, reason)


@dataclass(frozen=True)
class Reading:
    """One cycle: a sample per GPU index, the Xid events, and what reading cost."""

    samples: dict[int, GpuSample]
    xids: list[XidEvent]
    duration_s: float


def read_all(nvml: Nvml, indices: list[int]) -> Reading:
    """Blocking: sample every GPU and drain the Xid events (run it in a worker thread)."""
    started = time.perf_counter()
    samples = {index: nvml.sample(index) for index in indices}
    xids = nvml.xid_events()
    return Reading(samples, xids, time.perf_counter() - started)


def status_from(inventory: Inventory) -> dict[int, GpuStatus]:
    return {
        d.index: GpuStatus(
            index=d.index,
            uuid=d.uuid,
            name=d.name,
            pci_bus_id=d.pci_bus_id,
            memory_total_bytes=d.memory_total_bytes,
            mig_mode=d.mig_mode,
            driver_version=inventory.driver_version,
            cuda_version=inventory.cuda_version,
        )
        for d in inventory.devices
    }


def apply_sample(status: GpuStatus, sample: GpuSample) -> None:
    status.sampled_at = sample.at
    status.lost = sample.lost
    if sample.lost:
        return  # keep the last good readings; the GPU said nothing new
    for name in (
        "temperature_celsius",
        "power_watts",
        "utilization_ratio",
        "memory_utilization_ratio",
        "memory_used_bytes",
        "memory_free_bytes",
        "memory_total_bytes",
        "ecc_corrected_total",
        "ecc_uncorrected_total",
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "row_remap_pending",
        "row_remap_failed",
        "retired_pages_pending",
        "throttle_reasons",
    ):
        setattr(status, name, getattr(sample, name))


class GpuSampler:
    """Owns one NVML session for the node's life."""

    def __init__(
        self,
        nvml: Nvml,
        state: MachineState,
        policy: GpuPolicy,
        interval: float,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.nvml = nvml
        self.state = state
        self.policy = policy
        self.interval = interval
        self.quarantine = quarantine
        self.last_cycle_s: float | None = None

    async def open(self) -> None:
        inventory = await asyncio.to_thread(self.nvml.open)
        self.state.gpus = status_from(inventory)
        self.state.changed()

    async def cycle(self) -> None:
        """Read every GPU once, record it, quarantine what the policy rejects."""
        indices = sorted(self.state.gpus)
        reading = await asyncio.to_thread(read_all, self.nvml, indices)
        self.last_cycle_s = reading.duration_s
        by_uuid = {g.uuid: g for g in self.state.gpus.values()}
        new_xids: dict[int, list[int]] = {}
        for event in reading.xids:
            status = by_uuid.get(event.uuid)
            if status is None:
                continue
            status.xid_counts[event.code] = status.xid_counts.get(event.code, 0) + 1
            new_xids.setdefault(status.index, []).append(event.code)
            log.warning(
                "Xid",
                extra={"fields": {"gpu": status.index, "uuid": status.uuid, "xid": event.code}},
            )
        to_quarantine = []
        for index, sample in reading.samples.items():
            status = self.state.gpus[index]
            apply_sample(status, sample)
            verdict = evaluate(sample, new_xids.get(index, []), self.policy)
            status.unhealthy_samples, act = debounce(
                verdict, status.unhealthy_samples, self.policy
            )
            status.warnings = verdict.warnings
            if not verdict.healthy and not act and not status.quarantined:
                status.warnings += (
                    f"{verdict.reason} (unhealthy sample {status.unhealthy_samples} of "
                    f"{self.policy.unhealthy_samples} in a row before quarantine, "
                    "GPU_UNHEALTHY_SAMPLES)",
                )
            if act and not status.quarantined:
                status.quarantined = True
                status.quarantine_reason = verdict.reason
                to_quarantine.append(status)
        self.state.changed()
        for status in to_quarantine:
            reason = f"GPU {status.index} ({status.uuid}) quarantined: {status.quarantine_reason}"
            log.error("GPU unhealthy", extra={"fields": {"gpu": status.index, "reason": reason}})
            if self.quarantine is not None:
                await self.quarantine(status.uuid, reason)

    async def run(self) -> None:
        """Sample until cancelled (after ``open``); a failed cycle is logged, then retried."""
        try:
            while True:
                try:
                    await self.cycle()
                except GpuError as exc:
                    log.error("GPU sampling failed", extra={"fields": {"error": str(exc)}})
                except Exception:  # a bug must not end GPU health for the node's life
                    log.exception("GPU sampling failed unexpectedly")
                await asyncio.sleep(self.interval)
        finally:
            await asyncio.to_thread(self.nvml.close)
