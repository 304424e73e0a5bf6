"""A Comfy Registry stand-in for the tests: an aiohttp app on 127.0.0.1 answering as the
published API does (Comfy-Org/registry-backend openapi.yml and server/implementation
registry.go InstallNode):

- ``GET /nodes/{nodeId}/install[?version=X]`` -> 200 ``NodeVersion`` (``id``, ``version``,
  ``downloadUrl``, ``status``, ``deprecated``, ``node_id``, ...) of that version, or of the
  latest; 404 ``{"error": "", "message": "Node not found"}`` for an unknown node and
  ``{"message": "Not found"}`` for an unknown version.
- ``GET /nodes/{nodeId}/versions`` -> 200 ``[NodeVersion]`` newest first, 404 for an unknown
  node.
- ``GET /archives/{file}`` -> the zip archive the test built (``downloadUrl`` points there).

It runs on its own event loop in a thread, so the blocking installer can be pointed at it;
every request is counted (``requests``) and ``down`` makes it answer 503 to everything."""

from __future__ import annotations

import asyncio
import io
import stat
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def zip_bytes(
    files: dict[str, str | bytes], symlinks: dict[str, str] | None = None
) -> bytes:
    """A zip archive of ``files`` (member name -> content) and ``symlinks`` (member name ->
    target), as `comfy node pack` lays one out: the node's files at the top."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix: the mode bits below are read
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


@dataclass
class RegistryStandIn:
    """Nodes: id -> {version: archive bytes}; the last version added is the latest."""

    nodes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    down: bool = False
    download_query: str = ""  # appended to each downloadUrl (a signed URL's query, say)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def publish(self, node_id: str, version: str, archive: bytes) -> None:
        self.nodes.setdefault(node_id, {})[version] = archive

    @property
    def api_requests(self) -> int:
        """Requests to the API (not the archive downloads)."""
        return sum(n for path, n in self.requests.items() if path.startswith("/nodes/"))

    def _node_version(self, node_id: str, version: str) -> dict[str, Any]:
        return {
            "id": f"00000000-0000-0000-0000-{abs(hash((node_id, version))) % 10**12:012d}",
            "node_id": node_id,
            "version": version,
            "changelog": "",
            "dependencies": [],
            "deprecated": False,
            "status": "NodeVersionStatusActive",
            "status_reason": "",
            "createdAt": "2025-01-01T00:00:00Z",
            "downloadUrl": f"{self.url}/archives/{node_id}/{version}/node.zip"
            + self.download_query,
        }

    async def _count(self, request: web.Request) -> web.StreamResponse | None:
        self.requests[request.path] += 1
        if self.down:
            return web.json_response({"error": "", "message": "unavailable"}, status=503)
        return None

    async def install(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._count(request)) is not None:
            return early
        node_id = request.match_info["node_id"]
        versions = self.nodes.get(node_id)
        if versions is None:
            return web.json_response({"error": "", "message": "Node not found"}, status=404)
        version = request.query.get("version") or list(versions)[-1]
        if version not in versions:
            return web.json_response({"error": "", "message": "Not found"}, status=404)
        return web.json_response(self._node_version(node_id, version))

    async def versions(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._count(request)) is not None:
            return early
        node_id = request.match_info["node_id"]
        if node_id not in self.nodes:
            return web.json_response({"message": "Node not found"}, status=404)
        return web.json_response(
            [self._node_version(node_id, v) for v in reversed(self.nodes[node_id])]
        )

    async def archive(self, request: web.Request) -> web.StreamResponse:
        if (early := await self._count(request)) is not None:
            return early
        versions = self.nodes.get(request.match_info["node_id"], {})
        body = versions.get(request.match_info["version"])
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="application/zip")

    def start(self) -> RegistryStandIn:
        app = web.Application()
        app.router.add_get("/nodes/{node_id}/install", self.install)
        app.router.add_get("/nodes/{node_id}/versions", self.versions)
        app.router.add_get("/archives/{node_id}/{version}/node.zip", self.archive)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="registry-standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
