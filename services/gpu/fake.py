"""The fake NVML for tests, demos and benchmarks: the same ``services.gpu.interface.Nvml``
interface as the real adapter, over GPUs held in memory or in a JSON file a test rewrites to
inject faults into a running node (``MACHINE_FAKE_NVML``)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from config.errors import GpuError
from services.gpu.interface import NO_DRIVER_HINT, Gpu, GpuSample, Inventory, XidEvent


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
    With ``"compute_on_cpu": true`` the fake GPUs compute on the CPU: the sentinel self-test
    then runs there (as in CPU mode) instead of failing for want of CUDA.
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
        self.compute_on_cpu = False
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
        self.compute_on_cpu = bool(data.get("compute_on_cpu", False))

    def _inventory(self) -> Inventory:
        self._reload()
        if self.no_driver:
            raise GpuError(NO_DRIVER_HINT.format(detail="nvmlInit failed: Driver Not Loaded"))
        devices = tuple(
            Gpu(
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
