"""The plan of a node from its settings (GPU discovery, the proxy's binary): what `plan`, `up`,
`install` and `gpu-test` share, apart from the boot so that `comfy-machine plan` does not load
the boot's services (issue 14: the CLI answers fast)."""

from __future__ import annotations

import shutil

from config.errors import ConfigError, Problem
from config.settings import Settings, custom_node_specs
from services.gpu.adapters import nvml_for
from services.gpu.interface import Nvml, list_gpus
from services.plan import NodePlan, make_plan

__all__ = ["build_plan", "find_caddy", "nvml_for"]


def build_plan(settings: Settings, nvml: Nvml) -> NodePlan:
    """Discover GPUs (never in CPU mode) and plan; raises ConfigError/GpuError, starts nothing."""
    custom_node_specs(settings)  # custom-node errors exit 2 with the rest, before anything runs
    gpus = [] if settings.comfyui_cpu_only or not settings.enable_comfyui else list_gpus(nvml)
    return make_plan(settings, gpus, caddy=find_caddy(settings))


def find_caddy(settings: Settings) -> str:
    """The proxy's binary on PATH when COMFYUI_EXPOSE=proxy asks for it; raises ConfigError
    (exit 2, nothing started) when it is missing."""
    if settings.comfyui_expose != "proxy" or not settings.enable_comfyui:
        return "caddy"
    found = shutil.which("caddy")
    if found is None:
        raise ConfigError([Problem(
            "COMFYUI_EXPOSE", "'proxy'",
            "needs Caddy, the proxy, and `caddy` is not on PATH; install it (Debian and Ubuntu: "
            "apt-get install caddy; the comfy-machine image has it) or set COMFYUI_EXPOSE=none",
        )])
    return found
