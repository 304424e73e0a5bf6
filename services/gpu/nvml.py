"""One small NVML interface, implemented by the real adapter (pynvml) and by an honest fake.

Both satisfy ``services.gpus.GpuInventory`` (``list_gpus``), so either can feed the plan.
The sampler uses the rest: ``open`` once, then ``sample`` each GPU and drain ``xid_events``
every cycle from a worker thread (NVML calls block), ``close`` at the end."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from config.errors import GpuError
from services.gpus import NO_DRIVER_HINT, Gpu

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


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU as NVML lists it."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    pci_bus_id: str
    mig_mode: bool | None = None  # None: MIG not supported by this GPU

    def as_gpu(self) -> Gpu:
        return Gpu(self.index, self.uuid, self.name, self.memory_total_bytes, self.pci_bus_id)


@dataclass(frozen=True)
class Inventory:
    driver_version: str
    cuda_version: str
    devices: tuple[GpuDevice, ...]


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. A quantity this GPU cannot report is None. ``lost`` is set
    (with NVML's words) when the GPU stopped answering: fell off the bus, needs a reset."""

    at: float
    lost: str | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None
    retired_pages_pending: bool | None = None
    throttle_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class XidEvent:
    uuid: str
    code: int
    at: float


class Nvml(Protocol):
    """What comfy-machine asks of NVML. Every method may raise GpuError."""

    def list_gpus(self) -> list[Gpu]:
        """Every GPU in index order (opens and closes NVML itself when not open)."""
        ...

    def open(self) -> Inventory:
        """Initialise NVML for sampling; the inventory with driver and CUDA versions."""
        ...

    def sample(self, index: int) -> GpuSample:
        """Read one GPU now; a GPU that stopped answering gives a sample with ``lost`` set."""
        ...

    def xid_events(self) -> list[XidEvent]:
        """The Xid events since the last call, without waiting."""
        ...

    def close(self) -> None: ...


def throttle_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


def _text(value: str | bytes) -> str:
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

    def list_gpus(self) -> list[Gpu]:
        if self._nv is not None:
            return [d.as_gpu() for d in self._inventory(self._nv).devices]
        try:
            return [d.as_gpu() for d in self.open().devices]
        finally:
            self.close()

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
                    GpuDevice(
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


@dataclass
class FakeGpu:
    """A fake GPU's identity and its current readings; tests change these to inject faults."""

    uuid: str
    name: str = "NVIDIA GeForce RTX 4090"
    memory_total_bytes: int = 24 * 2**30
    pci_bus_id: str = ""
    mig_mode: bool | None = None
    temperature_celsius: float = 40.0
    power_watts: float = 60.0
    utilization_ratio: float = 0.0
    memory_used_bytes: int = 512 * 2**20
    ecc_corrected_total: int = 0
    ecc_uncorrected_total: int = 0
    row_remap_pending: bool = False
    row_remap_failed: bool = False
    retired_pages_pending: bool = False
    throttle_reasons: list[str] = field(default_factory=list)
    lost: bool = False
    xids: list[int] = field(default_factory=list)  # every Xid ever raised, in order


class FakeNvml:
    """NVML for tests and demos, behind the same interface as RealNvml.

    In memory (``FakeNvml(gpus)``) or backed by a JSON file (``FakeNvml.from_file``) that is
    re-read on every call, so a test can inject faults into a running node:
    ``{"driver_version": ..., "cuda_version": ..., "no_driver": false, "gpus": [FakeGpu fields]}``.
    """

    def __init__(
        self,
        gpus: list[FakeGpu],
        driver_version: str = "550.54.15",
        cuda_version: str = "12.4",
        path: Path | None = None,
    ) -> None:
        self.gpus = list(gpus)
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.no_driver = False
        self.path = path
        self.is_open = False
        self._xids_seen: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> FakeNvml:
        fake = cls([], path=path)
        fake._reload()
        return fake

    @staticmethod
    def write(path: Path, gpus: list[FakeGpu], **extra: Any) -> None:
        """Write the file ``from_file`` reads (atomically, so a reader never sees half)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**extra, "gpus": [asdict(g) for g in gpus]}))
        tmp.replace(path)

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise GpuError(f"fake NVML file {self.path} cannot be read: {exc}") from None
        known = {f.name for f in fields(FakeGpu)}
        self.gpus = [FakeGpu(**{k: v for k, v in g.items() if k in known}) for g in data["gpus"]]
        self.driver_version = data.get("driver_version", self.driver_version)
        self.cuda_version = data.get("cuda_version", self.cuda_version)
        self.no_driver = bool(data.get("no_driver", False))

    def _inventory(self) -> Inventory:
        self._reload()
        if self.no_driver:
            raise GpuError(NO_DRIVER_HINT.format(detail="nvmlInit failed: Driver Not Loaded"))
        devices = tuple(
            GpuDevice(
                index=i,
                uuid=g.uuid,
                name=g.name,
                memory_total_bytes=g.memory_total_bytes,
                pci_bus_id=g.pci_bus_id or f"00000000:{i + 1:02X}:00.0",
                mig_mode=g.mig_mode,
            )
            for i, g in enumerate(self.gpus)
        )
        return Inventory(self.driver_version, self.cuda_version, devices)

    def list_gpus(self) -> list[Gpu]:
        with self._lock:
            return [d.as_gpu() for d in self._inventory().devices]

    def open(self) -> Inventory:
        with self._lock:
            inventory = self._inventory()
            self.is_open = True
            # Events raised before open() are not delivered, as with a real event set.
            self._xids_seen = {g.uuid: len(g.xids) for g in self.gpus}
            return inventory

    def sample(self, index: int) -> GpuSample:
        with self._lock:
            if not self.is_open:
                raise GpuError("NVML is not open; call open() first")
            self._reload()
            g = self.gpus[index]
            now = time.time()
            if g.lost:
                return GpuSample(at=now, lost="NVML: GPU is lost")
            return GpuSample(
                at=now,
                temperature_celsius=g.temperature_celsius,
                power_watts=g.power_watts,
                utilization_ratio=g.utilization_ratio,
                memory_utilization_ratio=0.0,
                memory_used_bytes=g.memory_used_bytes,
                memory_free_bytes=g.memory_total_bytes - g.memory_used_bytes,
                memory_total_bytes=g.memory_total_bytes,
                ecc_corrected_total=g.ecc_corrected_total,
                ecc_uncorrected_total=g.ecc_uncorrected_total,
                remapped_rows_correctable=0,
                remapped_rows_uncorrectable=0,
                row_remap_pending=g.row_remap_pending,
                row_remap_failed=g.row_remap_failed,
                retired_pages_pending=g.retired_pages_pending,
                throttle_reasons=tuple(g.throttle_reasons),
            )

    def xid_events(self) -> list[XidEvent]:
        with self._lock:
            if not self.is_open:
                return []
            self._reload()
            now = time.time()
            events = []
            for g in self.gpus:
                seen = self._xids_seen.get(g.uuid, 0)
                events.extend(XidEvent(g.uuid, code, now) for code in g.xids[seen:])
                self._xids_seen[g.uuid] = len(g.xids)
            return events

    def close(self) -> None:
        with self._lock:
            self.is_open = False

    # Fault injectors for in-memory use (a file-backed fake is changed by rewriting the file).
    def inject_xid(self, index: int, code: int) -> None:
        with self._lock:
            self.gpus[index].xids.append(code)

    def inject_ecc(self, index: int, uncorrected: int = 1) -> None:
        with self._lock:
            self.gpus[index].ecc_uncorrected_total += uncorrected

    def lose(self, index: int) -> None:
        with self._lock:
            self.gpus[index].lost = True

    def heat(self, index: int, celsius: float) -> None:
        with self._lock:
            self.gpus[index].temperature_celsius = celsius
