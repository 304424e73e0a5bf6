"""Which NVML adapter a node uses: light to import (pynvml loads on first use), so that the
CLI's `plan` does not pay for the GPU guard's imports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.gpu.fake import FakeNvml
from services.gpu.nvml import RealNvml

if TYPE_CHECKING:
    from config.settings import Settings
    from services.gpu.interface import Nvml


def nvml_for(settings: Settings) -> Nvml:
    """The real adapter, or the file-backed fake when MACHINE_FAKE_NVML names one."""
    if settings.machine_fake_nvml is not None:
        return FakeNvml.from_file(settings.machine_fake_nvml)
    return RealNvml()
