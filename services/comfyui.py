"""Thin typed client for the parts of ComfyUI's HTTP API comfy-machine uses."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IEND chunk every PNG ends with (length 0, type, CRC): absent while one is being written.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class ComfyApiError(Exception):
    """ComfyUI answered, but not with what the API promises."""


@dataclass(frozen=True)
class QueueDepth:
    running: int
    pending: int


class ComfyClient:
    """Requests against one instance's base URL; the caller owns the aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get_json(self, path: str, **params: str) -> Any:
        async with self._session.get(
            self._base + path, params=params or None, timeout=self._timeout
        ) as resp:
            if resp.status != 200:
                raise ComfyApiError(f"GET {path} answered HTTP {resp.status}")
            return await resp.json()

    async def system_stats(self) -> dict[str, Any]:
        return await self._get_json("/system_stats")

    async def object_info(self) -> dict[str, Any]:
        return await self._get_json("/object_info")

    async def models(self, folder: str) -> list[str] | None:
        """GET /models/{folder}: the files listed there; None when ComfyUI has no such folder."""
        async with self._session.get(
            f"{self._base}/models/{quote(folder)}", timeout=self._timeout
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise ComfyApiError(f"GET /models/{folder} answered HTTP {resp.status}")
            return list(await resp.json())

    async def node_info(self, class_type: str) -> dict[str, Any]:
        """GET /object_info/{class_type}: that node's entry; {} when the node is unknown."""
        body = await self._get_json(f"/object_info/{quote(class_type)}")
        return body.get(class_type) or {}

    async def queue(self) -> QueueDepth:
        body = await self._get_json("/queue")
        return QueueDepth(running=len(body["queue_running"]), pending=len(body["queue_pending"]))

    async def post_prompt(self, prompt: dict[str, Any], client_id: str) -> str:
        """Queue ``prompt``; return its prompt_id or raise with ComfyUI's validation errors."""
        async with self._session.post(
            self._base + "/prompt",
            json={"prompt": prompt, "client_id": client_id},
            timeout=self._timeout,
        ) as resp:
            if resp.status == 200:
                return (await resp.json())["prompt_id"]
            text = await resp.text()
            raise ComfyApiError(f"POST /prompt answered HTTP {resp.status}: {text[:500]}")

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of ``prompt_id``, None while it has none (queued or running)."""
        body = await self._get_json(f"/history/{prompt_id}")
        return body.get(prompt_id)

    async def view(self, filename: str, subfolder: str, kind: str) -> bytes:
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        async with self._session.get(
            self._base + "/view", params=params, timeout=self._timeout
        ) as resp:
            if resp.status != 200:
                raise ComfyApiError(f"GET /view?filename={filename} answered HTTP {resp.status}")
            return await resp.read()


def history_error(entry: dict[str, Any]) -> str:
    """The readable error of a failed history entry (execution_error's exception message)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (
                f"{data.get('node_type')} (node {data.get('node_id')}): "
                f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}"
            )
    return f"status {entry.get('status', {}).get('status_str')!r}"


def saved_files(folder: Path, stem: str) -> list[Path]:
    """The files SaveImage wrote for ``filename_prefix`` ``<subfolder>/<stem>`` (it names them
    ``{stem}_{counter:05}_.png``), whole or not."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [folder / n for n in names if n.startswith(f"{stem}_") and n.endswith("_.png")]


def saved_image(folder: Path, stem: str) -> Path | None:
    """The first whole PNG of :func:`saved_files`; None while there is none, or only a part."""
    for path in saved_files(folder, stem):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END):
            return path
    return None


def remove_saved(folder: Path, stem: str) -> None:
    """Remove every file of :func:`saved_files` (whatever cannot be removed stays)."""
    for path in saved_files(folder, stem):
        with contextlib.suppress(OSError):
            path.unlink()
