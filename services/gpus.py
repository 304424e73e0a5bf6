"""GPU discovery behind one small interface: the real NVML adapter and an honest fake."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from config.errors import GpuError


@dataclass(frozen=True)
class Gpu:
    """One device an instance can be bound to (a CPU slot in CPU mode)."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int = 0
    pci_bus_id: str = ""

    @property
    def is_cpu(self) -> bool:
        return self.uuid.startswith("cpu-")


class GpuInventory(Protocol):
    """What the plan needs to know about the machine's GPUs."""

    def list_gpus(self) -> list[Gpu]:
        """Every GPU the driver reports, in index order; raises GpuError when it cannot tell."""
        ...


def cpu_slots(count: int) -> list[Gpu]:
    """Pseudo-GPUs for CPU mode: one slot per instance, never touching NVML."""
    return [Gpu(index=i, uuid=f"cpu-{i}", name="cpu") for i in range(count)]


class FakeInventory:
    """A fixed list of GPUs, for tests and CPU mode; same interface as NvmlInventory."""

    def __init__(self, gpus: list[Gpu]) -> None:
        self._gpus = list(gpus)

    def list_gpus(self) -> list[Gpu]:
        return list(self._gpus)


NO_DRIVER_HINT = (
    "no NVIDIA driver could be used ({detail}); run on a GPU host with the driver and "
    "the NVIDIA container runtime (docker --gpus all / nvidia.com/gpu), or set "
    "COMFYUI_CPU_ONLY=true for development without a GPU"
)


class NvmlInventory:
    """The real adapter over NVML (the pynvml module of nvidia-ml-py)."""

    def list_gpus(self) -> list[Gpu]:
        try:
            import pynvml
        except ImportError as exc:  # the package is a dependency; this means a broken install
            raise GpuError(NO_DRIVER_HINT.format(detail=f"pynvml not importable: {exc}")) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuError(NO_DRIVER_HINT.format(detail=f"nvmlInit failed: {exc}")) from None
        try:
            gpus = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    Gpu(
                        index=index,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(memory.total),
                        pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
                    )
                )
            return gpus
        except pynvml.NVMLError as exc:
            raise GpuError(f"NVML could not list the GPUs: {exc}; check `nvidia-smi`") from None
        finally:
            pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str on current versions and bytes on old ones.
    return value.decode() if isinstance(value, bytes) else value
