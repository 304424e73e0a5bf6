"""A real local HTTP file server for model tests and the benchmark (no tests of its own),
on 127.0.0.1 only.

Routes (``name`` is a file under the server's root):
- ``/files/{name}``: aiohttp's FileResponse (Range, ETag, If-Range).
- ``/norange/{name}``: the whole file, always 200, Range ignored.
- ``/slow/{name}``: the whole file in 64 KiB pieces, ``slow_delay`` seconds apart.
- ``/drop/{name}``: the first ``drops[name]`` requests send half the file and cut the
  connection; later ones behave as ``/files``.
- ``/wrong/{name}``: as many bytes as the file, other content.
- ``/auth/{name}``: 401 without ``Authorization: Bearer <token>``, else ``/files``.
- ``/chunked/{name}``: the whole file without Content-Length (chunked encoding).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from aiohttp import web

PIECE = 64 * 1024


class FileServer:
    def __init__(self, root: Path, token: str = "tok-SECRET-4242") -> None:
        self.root = root
        self.token = token
        self.slow_delay = 0.01
        self.drops: dict[str, int] = {}
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) per request
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, route: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{route}/{name}"

    def _file(self, request: web.Request) -> Path:
        path = (self.root / request.match_info["name"]).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        self.ranges.append((request.path, request.headers.get("Range")))
        return path

    async def _files(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self._file(request), chunk_size=1 << 20)

    async def _norange(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self._file(request).read_bytes(), content_type="application/octet-stream"
        )

    async def _stream(
        self, request: web.Request, data: bytes, length: bool, delay: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse()
        if length:
            resp.content_length = len(data)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(data), PIECE):
            await resp.write(data[start : start + PIECE])
            if delay:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, self._file(request).read_bytes(), True, self.slow_delay)

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, self._file(request).read_bytes(), False, 0)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        path = self._file(request)
        name = request.match_info["name"]
        if self.drops.get(name, 0) <= 0:
            return web.FileResponse(path)
        self.drops[name] -= 1
        data = path.read_bytes()
        st = path.stat()  # the same ETag FileResponse gives, so a resume is accepted
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        resp = web.StreamResponse(headers={"ETag": etag, "Accept-Ranges": "bytes"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-stream
        return resp

    async def _wrong(self, request: web.Request) -> web.StreamResponse:
        size = self._file(request).stat().st_size
        return web.Response(body=b"\0" * size, content_type="application/octet-stream")

    async def _auth(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        return web.FileResponse(self._file(request))

    async def _start(self) -> None:
        app = web.Application()
        for route, handler in (
            ("files", self._files),
            ("norange", self._norange),
            ("slow", self._slow),
            ("drop", self._drop),
            ("wrong", self._wrong),
            ("auth", self._auth),
            ("chunked", self._chunked),
        ):
            app.router.add_get(f"/{route}/{{name:.+}}", handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> FileServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
