"""The plain GPU types and the one NVML interface (``Nvml``) that the real adapter
(services/gpu/nvml.py) and the fake (services/gpu/fake.py) both implement.

``gpu`` everywhere a user sees it (instance names, ports, health paths, metric labels, CLI
``--gpu``) is ``Gpu.index``: the NVML index, as ``nvidia-smi`` numbers the GPUs; in CPU mode
the slots are numbered 0..N-1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

NO_DRIVER_HINT = (
    "no NVIDIA driver could be used ({detail}); run on a GPU host with the driver and "
    "the NVIDIA container runtime (docker --gpus all / nvidia.com/gpu), or set "
    "COMFYUI_CPU_ONLY=true for development without a GPU"
)


@dataclass(frozen=True)
class Gpu:
    """One device an instance can be bound to, as NVML lists it (a CPU slot in CPU mode)."""

    index: int  # the NVML index (nvidia-smi's); the slot number in CPU mode
    uuid: str
    name: str
    memory_total_bytes: int = 0
    pci_bus_id: str = ""
    mig_mode: bool | None = None  # None: MIG not supported by this GPU (or not asked)

    @property
    def is_cpu(self) -> bool:
        return self.uuid.startswith("cpu-")


def cpu_slots(count: int) -> list[Gpu]:
    """Pseudo-GPUs for CPU mode: one slot per instance, indices 0..count-1, never NVML."""
    return [Gpu(index=i, uuid=f"cpu-{i}", name="cpu") for i in range(count)]


@dataclass(frozen=True)
class Inventory:
    """What ``Nvml.open`` found: the driver, and every GPU in index order."""

    driver_version: str
    cuda_version: str
    devices: tuple[Gpu, ...]


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
    """What comfy-machine asks of NVML. Every method may raise GpuError.

    ``open`` once (the inventory), then ``sample`` each GPU and drain ``xid_events`` every
    cycle from a worker thread (NVML calls block), ``close`` at the end."""

    def open(self) -> Inventory:
        """Initialise NVML; the inventory with driver and CUDA versions."""
        ...

    def sample(self, index: int) -> GpuSample:
        """Read one GPU now; a GPU that stopped answering gives a sample with ``lost`` set."""
        ...

    def xid_events(self) -> list[XidEvent]:
        """The Xid events since the last call, without waiting."""
        ...

    def close(self) -> None: ...


def list_gpus(nvml: Nvml) -> list[Gpu]:
    """Every GPU in index order, for the plan: open NVML, read the inventory, close it."""
    try:
        return list(nvml.open().devices)
    finally:
        nvml.close()
