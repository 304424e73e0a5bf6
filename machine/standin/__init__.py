"""ComfyUI stand-in: a small aiohttp program that imitates the part of ComfyUI's HTTP API
that comfy-machine uses (same response shapes, status codes and log lines), for development
and tests on machines without a GPU or a real ComfyUI install.

The program itself lives in ``SOURCE_DIR`` (``main.py`` plus a few modules). It is never
imported by comfy-machine: it is copied or installed like a ComfyUI checkout and run as
``python main.py --listen ... --port ...`` from that directory.
"""

from pathlib import Path

#: Directory holding the stand-in's program files (``main.py``, ``requirements.txt``, ...).
SOURCE_DIR: Path = Path(__file__).resolve().parent / "comfyui"

#: The ``comfyui_version`` the stand-in reports in ``/system_stats`` and its start-up log.
STANDIN_COMFYUI_VERSION: str = "0.3.64-standin"

__all__ = ["SOURCE_DIR", "STANDIN_COMFYUI_VERSION"]
