"""The HTTP and websocket API (ComfyUI's ``server.py``), on aiohttp.

Routes, status codes, bodies and content types follow the recordings of ComfyUI 0.3.64.
Every public route also answers under ``/api``; the ``/internal`` routes do not. A path
that matches no route gives ComfyUI's empty ``404`` (``application/octet-stream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import struct
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import app_logging
import model_paths
from aiohttp import web
from node_registry import node_info
from nodes import EXTENSION_WEB_DIRS, NODE_CLASS_MAPPINGS
from progress import interrupt_processing
from prompt_queue import PromptQueue
from validation import validate_prompt

COMFYUI_VERSION = "0.3.64-standin"
PYTORCH_VERSION = "none (comfyui-standin)"
REQUIRED_FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
# Keys ComfyUI keeps out of the queue and the history (API tokens).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

# The frontend's own extension scripts, as listed by ComfyUI 0.3.64 (GET /extensions).
CORE_EXTENSIONS = [
    "/extensions/core/groupNode.js",
    "/extensions/core/maskEditorOld.js",
    "/extensions/core/clipspace.js",
    "/extensions/core/maskEditorLayerFilenames.js",
    "/extensions/core/widgetInputs.js",
    "/extensions/core/groupNodeManage.js",
    "/extensions/core/load3d/NodeStorage.js",
    "/extensions/core/load3d/ViewHelperManager.js",
    "/extensions/core/load3d/ControlsManager.js",
    "/extensions/core/load3d/RecordingManager.js",
    "/extensions/core/load3d/ModelExporter.js",
    "/extensions/core/load3d/AnimationManager.js",
    "/extensions/core/load3d/LoaderManager.js",
    "/extensions/core/load3d/LightingManager.js",
    "/extensions/core/load3d/CameraManager.js",
    "/extensions/core/load3d/SceneModelManager.js",
    "/extensions/core/load3d/SceneManager.js",
    "/extensions/core/load3d/PreviewManager.js",
    "/extensions/core/load3d/EventManager.js",
]

INDEX_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ComfyUI stand-in</title></head>
<body><p>ComfyUI stand-in: API only, no frontend.</p></body></html>
"""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Served as downloads by /view, never rendered by a browser.
UNSAFE_CONTENT_TYPES = frozenset(
    {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
)


def memory_info() -> tuple[int, int]:
    """``(total, available)`` RAM in bytes, from /proc/meminfo (sysconf as a fallback)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def _same_file_content(path: str, data: bytes) -> bool:
    """Whether ``path`` exists and holds exactly ``data`` (compared by sha256, like ComfyUI)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def _save_upload(
    upload_dir: str, subfolder: str, filename: str, data: bytes, overwrite: bool
) -> str | None:
    """Store an upload like ComfyUI: returns the final name, or None for a bad path.

    Without ``overwrite`` an existing file gets a `` (1)`` style suffix, unless its content
    is identical, in which case nothing is written and the same name is returned.
    """
    full_output_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(full_output_folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return None
    os.makedirs(full_output_folder, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    duplicate = False
    if not overwrite:
        i = 1
        while os.path.exists(filepath):
            if _same_file_content(filepath, data):
                duplicate = True
                break
            filename = f"{stem} ({i}){ext}"
            filepath = os.path.join(full_output_folder, filename)
            i += 1
    if not duplicate:
        with open(filepath, "wb") as f:
            f.write(data)
    return filename


def list_extensions() -> list[str]:
    """``/extensions``: the frontend's scripts plus every ``.js`` in custom node web dirs."""
    extensions = list(CORE_EXTENSIONS)
    for name, directory in EXTENSION_WEB_DIRS.items():
        for root, _dirs, files in sorted(os.walk(directory)):
            for file in sorted(files):
                if file.endswith(".js"):
                    rel = os.path.relpath(os.path.join(root, file), directory)
                    extensions.append(f"/extensions/{quote(name)}/{rel.replace(os.sep, '/')}")
    return extensions


def resolve_view_file(query: Mapping[str, str]) -> tuple[int, str | None]:
    """Map ``/view`` parameters to a file: ``(200, path)`` or ``(status, None)``.

    Like ComfyUI: no filename or a missing file is 404, a name with ``..`` or a leading
    ``/`` (or an unknown ``type``) is 400, a subfolder outside the directory is 403.
    """
    if "filename" not in query:
        return 404, None
    filename, output_dir = model_paths.annotated_filepath(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return 400, None
    if output_dir is None:
        output_dir = model_paths.get_directory_by_type(query.get("type", "output"))
    if output_dir is None:
        return 400, None
    if "subfolder" in query:
        full_output_dir = os.path.join(output_dir, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
            return 403, None
        output_dir = full_output_dir
    file = os.path.join(output_dir, os.path.basename(filename))
    if not os.path.isfile(file):
        return 404, None
    return 200, file


@web.middleware
async def empty_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer paths that match no route with ComfyUI's empty octet-stream 404."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        if request.match_info.http_exception is None:
            raise  # a handler's own 404
        response = web.StreamResponse(status=404)
        await response.prepare(request)
        await response.write_eof()
        return response


class PromptServer:
    """Routes, websocket clients and the prompt queue of one stand-in process.

    As in ComfyUI, custom nodes may use ``PromptServer.instance``: ``send_sync`` to message
    clients and ``routes`` (an aiohttp ``RouteTableDef``) to add their own API routes.
    """

    instance: PromptServer

    def __init__(self, loop: asyncio.AbstractEventLoop, max_upload_size_mb: float) -> None:
        PromptServer.instance = self
        self.loop = loop
        self.routes = web.RouteTableDef()  # for custom nodes, added with the built-in ones
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.messages: asyncio.Queue[tuple[str | int, Any, str | None]] = asyncio.Queue()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.number = 0
        self.max_upload_size = round(max_upload_size_mb * 1024 * 1024)
        self.prompt_queue = PromptQueue(self)
        self.app = web.Application(
            client_max_size=self.max_upload_size, middlewares=[empty_not_found]
        )

    # ------------------------------------------------------------------ messaging

    def get_queue_info(self) -> dict[str, Any]:
        """The ``status`` payload: how many prompts are pending or running."""
        return {"exec_info": {"queue_remaining": self.prompt_queue.get_tasks_remaining()}}

    def queue_updated(self) -> None:
        """Broadcast the queue size to every websocket client."""
        self.send_sync("status", {"status": self.get_queue_info()})

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue a message for the publisher; safe to call from any thread."""
        # RuntimeError: the loop is closed, the server is shutting down.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))

    async def send(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Send one message now: JSON ``{type, data}``, or a binary frame for int events."""
        if sid is None:
            targets = list(self.sockets.values())
        elif sid in self.sockets:
            targets = [self.sockets[sid]]
        else:
            return
        for ws in targets:
            try:
                if isinstance(event, int):
                    await ws.send_bytes(struct.pack(">I", event) + data)
                else:
                    await ws.send_str(json.dumps({"type": event, "data": data}))
            except (aiohttp.ClientError, ConnectionError):
                logging.warning("send error: client went away")

    async def publish_loop(self) -> None:
        """Deliver queued messages in order, forever."""
        while True:
            event, data, sid = await self.messages.get()
            await self.send(event, data, sid)

    async def close_sockets(self) -> None:
        """Close every websocket (at shutdown, so the runner need not wait for them)."""
        for ws in list(self.sockets.values()):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"Server shutdown")

    # ------------------------------------------------------------------ routes

    def add_routes(self) -> None:
        """Register every route, with its ``/api`` alias, plus ``/internal`` and statics."""
        routes = web.RouteTableDef()

        @routes.get("/ws")
        async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            sid = request.rel_url.query.get("clientId", "")
            if sid:
                self.sockets.pop(sid, None)  # a reconnect replaces the old socket
            else:
                sid = uuid.uuid4().hex
            self.sockets[sid] = ws
            self.sockets_metadata[sid] = {"feature_flags": {}}
            try:
                await self.send("status", {"status": self.get_queue_info(), "sid": sid}, sid)
                if self.client_id == sid and self.last_node_id is not None:
                    await self.send("executing", {"node": self.last_node_id}, sid)
                first_message = True
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.ERROR:
                        logging.warning(f"ws connection closed with exception {ws.exception()}")
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            data = json.loads(msg.data)
                            if first_message and data.get("type") == "feature_flags":
                                self.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
                                await self.send("feature_flags", self.features(), sid)
                            first_message = False
                        except (json.JSONDecodeError, AttributeError):
                            logging.warning(f"Invalid JSON received from client {sid}: {msg.data}")
            finally:
                if self.sockets.get(sid) is ws:
                    self.sockets.pop(sid, None)
                    self.sockets_metadata.pop(sid, None)
            return ws

        @routes.get("/")
        async def get_root(request: web.Request) -> web.Response:
            return web.Response(text=INDEX_HTML, content_type="text/html")

        @routes.get("/embeddings")
        async def get_embeddings(request: web.Request) -> web.Response:
            names = model_paths.get_filename_list("embeddings")
            return web.json_response([os.path.splitext(n)[0] for n in names])

        @routes.get("/models")
        async def list_model_types(request: web.Request) -> web.Response:
            return web.json_response(list(model_paths.folder_names_and_paths))

        @routes.get("/models/{folder}")
        async def get_models(request: web.Request) -> web.Response:
            folder = request.match_info.get("folder", "")
            if folder not in model_paths.folder_names_and_paths:
                return web.Response(status=404)
            return web.json_response(model_paths.get_filename_list(folder))

        @routes.get("/extensions")
        async def get_extensions(request: web.Request) -> web.Response:
            return web.json_response(list_extensions())

        @routes.post("/upload/image")
        async def upload_image(request: web.Request) -> web.Response:
            post = await request.post()
            image = post.get("image")
            upload_type = str(post.get("type") or "input")
            upload_dir = model_paths.get_directory_by_type(upload_type)
            if upload_dir is None or not isinstance(image, web.FileField) or not image.filename:
                return web.Response(status=400)
            subfolder = str(post.get("subfolder", ""))
            overwrite = str(post.get("overwrite")) in ("true", "1")
            name = _save_upload(upload_dir, subfolder, image.filename, image.file.read(), overwrite)
            if name is None:
                return web.Response(status=400)
            return web.json_response({"name": name, "subfolder": subfolder, "type": upload_type})

        @routes.get("/view")
        async def view_image(request: web.Request) -> web.StreamResponse:
            status, file = resolve_view_file(request.rel_url.query)
            if file is None:
                return web.Response(status=status)
            filename = os.path.basename(file)
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            if content_type in UNSAFE_CONTENT_TYPES:
                content_type = "application/octet-stream"  # force a download
            return web.FileResponse(
                file,
                headers={
                    "Content-Disposition": f'filename="{filename}"',
                    "Content-Type": content_type,
                },
            )

        @routes.get("/system_stats")
        async def system_stats(request: web.Request) -> web.Response:
            ram_total, ram_free = memory_info()
            return web.json_response(
                {
                    "system": {
                        "os": os.name,
                        "ram_total": ram_total,
                        "ram_free": ram_free,
                        "comfyui_version": COMFYUI_VERSION,
                        "required_frontend_version": REQUIRED_FRONTEND_VERSION,
                        "installed_templates_version": TEMPLATES_VERSION,
                        "required_templates_version": TEMPLATES_VERSION,
                        "python_version": sys.version,
                        "pytorch_version": PYTORCH_VERSION,
                        "embedded_python": os.path.basename(os.path.dirname(sys.executable))
                        == "python_embeded",
                        "argv": sys.argv,
                    },
                    "devices": [
                        {
                            "name": "cpu",
                            "type": "cpu",
                            "index": None,
                            "vram_total": ram_total,
                            "vram_free": ram_free,
                            "torch_vram_total": ram_total,
                            "torch_vram_free": ram_free,
                        }
                    ],
                }
            )

        @routes.get("/features")
        async def get_features(request: web.Request) -> web.Response:
            return web.json_response(self.features())

        @routes.get("/prompt")
        async def get_prompt(request: web.Request) -> web.Response:
            return web.json_response(self.get_queue_info())

        @routes.get("/object_info")
        async def get_object_info(request: web.Request) -> web.Response:
            out: dict[str, Any] = {}
            for name in list(NODE_CLASS_MAPPINGS):
                try:
                    out[name] = node_info(name)
                except Exception:
                    logging.exception(
                        "[ERROR] An error occurred while retrieving information for the "
                        f"'{name}' node."
                    )
            return web.json_response(out)

        @routes.get("/object_info/{node_class}")
        async def get_object_info_node(request: web.Request) -> web.Response:
            node_class = request.match_info.get("node_class")
            out: dict[str, Any] = {}
            if node_class is not None and node_class in NODE_CLASS_MAPPINGS:
                out[node_class] = node_info(node_class)
            return web.json_response(out)

        @routes.get("/history")
        async def get_history(request: web.Request) -> web.Response:
            max_items = request.rel_url.query.get("max_items")
            offset = request.rel_url.query.get("offset")
            return web.json_response(
                self.prompt_queue.get_history(
                    max_items=int(max_items) if max_items is not None else None,
                    offset=int(offset) if offset is not None else -1,
                )
            )

        @routes.get("/history/{prompt_id}")
        async def get_history_prompt_id(request: web.Request) -> web.Response:
            return web.json_response(
                self.prompt_queue.get_history(prompt_id=request.match_info["prompt_id"])
            )

        @routes.get("/queue")
        async def get_queue(request: web.Request) -> web.Response:
            running, pending = self.prompt_queue.get_current_queue()
            return web.json_response(
                {
                    "queue_running": [list(x[:5]) for x in running],
                    "queue_pending": [list(x[:5]) for x in pending],
                }
            )

        @routes.post("/prompt")
        async def post_prompt(request: web.Request) -> web.Response:
            logging.info("got prompt")
            # Malformed JSON raises here and becomes aiohttp's plain 500, as in ComfyUI.
            json_data = await request.json()
            if "number" in json_data:
                number: float = float(json_data["number"])
            else:
                number = self.number
                if json_data.get("front"):
                    number = -number
                self.number += 1

            if "prompt" not in json_data:
                error = {
                    "type": "no_prompt",
                    "message": "No prompt provided",
                    "details": "No prompt provided",
                    "extra_info": {},
                }
                return web.json_response({"error": error, "node_errors": {}}, status=400)

            prompt = json_data["prompt"]
            prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
            valid = validate_prompt(prompt, json_data.get("partial_execution_targets"))
            extra_data = json_data.get("extra_data", {})
            if "client_id" in json_data:
                extra_data["client_id"] = json_data["client_id"]
            if not valid[0]:
                logging.warning(f"invalid prompt: {valid[1]}")
                return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                extra_data.pop(key, None)
            self.prompt_queue.put((number, prompt_id, prompt, extra_data, valid[2]))
            return web.json_response(
                {"prompt_id": prompt_id, "number": number, "node_errors": valid[3]}
            )

        @routes.post("/queue")
        async def post_queue(request: web.Request) -> web.Response:
            json_data = await request.json()
            if json_data.get("clear"):
                self.prompt_queue.wipe_queue()
            for id_to_delete in json_data.get("delete", []):
                self.prompt_queue.delete_queue_item(lambda a, i=id_to_delete: a[1] == i)
            return web.Response(status=200)

        @routes.post("/interrupt")
        async def post_interrupt(request: web.Request) -> web.Response:
            try:
                json_data = await request.json()
            except json.JSONDecodeError:
                json_data = {}
            prompt_id = json_data.get("prompt_id")
            if prompt_id:
                running, _ = self.prompt_queue.get_current_queue()
                if any(item[1] == prompt_id for item in running):
                    logging.info(f"Interrupting prompt {prompt_id}")
                    interrupt_processing()
                else:
                    logging.info(f"Prompt {prompt_id} is not currently running, skipping interrupt")
            else:
                logging.info("Global interrupt (no prompt_id specified)")
                interrupt_processing()
            return web.Response(status=200)

        @routes.post("/free")
        async def post_free(request: web.Request) -> web.Response:
            json_data = await request.json()
            for flag in ("unload_models", "free_memory"):
                if json_data.get(flag, False):
                    self.prompt_queue.set_flag(flag, json_data[flag])
            return web.Response(status=200)

        @routes.post("/history")
        async def post_history(request: web.Request) -> web.Response:
            json_data = await request.json()
            if json_data.get("clear"):
                self.prompt_queue.wipe_history()
            for id_to_delete in json_data.get("delete", []):
                self.prompt_queue.delete_history_item(id_to_delete)
            return web.Response(status=200)

        # Every public route twice: as is and under /api (the frontend uses /api).
        for route in [*routes, *self.routes]:
            if isinstance(route, web.RouteDef):
                self.app.router.add_route(route.method, route.path, route.handler, **route.kwargs)
                self.app.router.add_route(
                    route.method, "/api" + route.path, route.handler, **route.kwargs
                )
            else:
                self.app.router.add_routes([route])  # e.g. a custom node's web.static

        # Internal routes: no /api alias in ComfyUI.
        self.app.router.add_get("/internal/logs", self.get_logs)
        self.app.router.add_get("/internal/logs/raw", self.get_raw_logs)
        self.app.router.add_get("/internal/folder_paths", self.get_folder_paths)

        for name, directory in EXTENSION_WEB_DIRS.items():
            self.app.router.add_static("/extensions/" + quote(name), directory)

    def features(self) -> dict[str, Any]:
        """Server feature flags (``/features`` and the websocket handshake)."""
        return {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size}

    async def get_logs(self, request: web.Request) -> web.Response:
        """``/internal/logs``: the log ring buffer as one ``ISO-time - message`` string."""
        return web.json_response("".join(e["t"] + " - " + e["m"] for e in app_logging.get_logs()))

    async def get_raw_logs(self, request: web.Request) -> web.Response:
        """``/internal/logs/raw``: the ring buffer entries and the terminal size."""
        cols, rows = app_logging.terminal_size()
        return web.json_response(
            {"entries": app_logging.get_logs(), "size": {"cols": cols, "rows": rows}}
        )

    async def get_folder_paths(self, request: web.Request) -> web.Response:
        """``/internal/folder_paths``: every model folder with its search paths."""
        return web.json_response({k: v[0] for k, v in model_paths.folder_names_and_paths.items()})
