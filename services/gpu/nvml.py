"""The real NVML adapter over pynvml (nvidia-ml-py): the implementation of
``services.gpu.interface.Nvml`` that talks to a driver. It serves both the inventory the plan
is made from (``list_gpus(RealNvml())``) and the sampler's readings and Xid events."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from config.errors import GpuError
from services.gpu.interface import NO_DRIVER_HINT, Gpu, GpuSample, Inventory, XidEvent

# NVML clock-event ("throttle") reason bits, by name (nvml.h nvmlClocksEventReason*).
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def throttle_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str on current versions and bytes on old ones.
    return value.decode() if isinstance(value, bytes) else value


class RealNvml:
    """The adapter over pynvml (nvidia-ml-py). One instance per sampler; not thread-safe
    beyond one worker thread at a time."""

    def __init__(self) -> None:
        self._nv: Any = None
        self._handles: list[Any] = []
        self._uuids: list[str] = []
        self._events: Any = None

    def _init(self) -> Any:
        try:
            import pynvml
        except ImportError as exc:
            raise GpuError(NO_DRIVER_HINT.format(detail=f"pynvml not importable: {exc}")) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuError(NO_DRIVER_HINT.format(detail=f"nvmlInit failed: {exc}")) from None
        return pynvml

    def open(self) -> Inventory:
        nv = self._init()
        self._nv = nv
        inventory = self._inventory(nv)
        self._events = None
        try:
            events = nv.nvmlEventSetCreate()
            for handle in self._handles:
                # Not supported on some GPUs (vGPU, old consumer cards): no Xid events from them.
                with contextlib.suppress(nv.NVMLError):
                    nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, events)
            self._events = events
        except nv.NVMLError:
            self._events = None
        return inventory

    def _inventory(self, nv: Any) -> Inventory:
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            cuda = nv.nvmlSystemGetCudaDriverVersion()
            devices = []
            self._handles, self._uuids = [], []
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                try:
                    mig: bool | None = bool(nv.nvmlDeviceGetMigMode(handle)[0])
                except nv.NVMLError:
                    mig = None
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
                devices.append(
                    Gpu(
                        index=index,
                        uuid=uuid,
                        name=_text(nv.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(nv.nvmlDeviceGetMemoryInfo(handle).total),
                        pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(handle).busId),
                        mig_mode=mig,
                    )
                )
                self._handles.append(handle)
                self._uuids.append(uuid)
        except nv.NVMLError as exc:
            raise GpuError(f"NVML could not list the GPUs: {exc}; check `nvidia-smi`") from None
        return Inventory(driver, f"{cuda // 1000}.{cuda % 1000 // 10}", tuple(devices))

    def sample(self, index: int) -> GpuSample:
        nv = self._nv
        if nv is None:
            raise GpuError("NVML is not open; call open() first")
        handle = self._handles[index]
        now = time.time()
        values: dict[str, Any] = {}

        def read(fn: Any) -> Any:
            # A quantity this GPU or driver cannot give (not supported, no permission, vGPU)
            # stays None; a lost GPU ends the sample.
            try:
                return fn()
            except nv.NVMLError_GpuIsLost:
                raise
            except nv.NVMLError:
                return None

        try:
            values["temperature_celsius"] = read(
                lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            )
            power = read(lambda: nv.nvmlDeviceGetPowerUsage(handle))
            values["power_watts"] = None if power is None else power / 1000.0
            util = read(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
            if util is not None:
                values["utilization_ratio"] = util.gpu / 100.0
                values["memory_utilization_ratio"] = util.memory / 100.0
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            values["memory_used_bytes"] = int(memory.used)
            values["memory_free_bytes"] = int(memory.free)
            values["memory_total_bytes"] = int(memory.total)
            for key, kind in (
                ("ecc_corrected_total", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                ("ecc_uncorrected_total", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ):
                values[key] = read(
                    lambda kind=kind: int(
                        nv.nvmlDeviceGetTotalEccErrors(handle, kind, nv.NVML_VOLATILE_ECC)
                    )
                )
            rows = read(lambda: nv.nvmlDeviceGetRemappedRows(handle))
            if rows is not None:
                correctable, uncorrectable, pending, failed = rows
                values.update(
                    remapped_rows_correctable=int(correctable),
                    remapped_rows_uncorrectable=int(uncorrectable),
                    row_remap_pending=bool(pending),
                    row_remap_failed=bool(failed),
                )
            retired = read(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(handle))
            values["retired_pages_pending"] = None if retired is None else bool(retired)
            reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
                nv.nvmlDeviceGetCurrentClocksThrottleReasons
            )
            mask = read(lambda: reasons(handle))
            values["throttle_reasons"] = throttle_names(mask or 0)
        except nv.NVMLError_GpuIsLost as exc:
            return GpuSample(at=now, lost=f"NVML: {exc}")
        except nv.NVMLError as exc:
            return GpuSample(at=now, lost=f"NVML could not read the GPU: {exc}")
        return GpuSample(at=now, **values)

    def xid_events(self) -> list[XidEvent]:
        nv, events = self._nv, self._events
        if nv is None or events is None:
            return []
        found = []
        while True:
            try:
                data = nv.nvmlEventSetWait_v2(events, 0)
            except nv.NVMLError_Timeout:
                return found
            except nv.NVMLError:
                return found
            if data.eventType == nv.nvmlEventTypeXidCriticalError:
                uuid = _text(nv.nvmlDeviceGetUUID(data.device))
                found.append(XidEvent(uuid, int(data.eventData), time.time()))

    def close(self) -> None:
        nv, self._nv = self._nv, None
        if nv is None:
            return
        if self._events is not None:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlEventSetFree(self._events)
            self._events = None
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
