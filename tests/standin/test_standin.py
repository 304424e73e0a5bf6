"""The ComfyUI stand-in against recordings of a real ComfyUI 0.3.64.

Every test runs real stand-in processes (see conftest.py) and compares what they answer
with the captures in ``tests/fixtures/comfyui-0.3.64``: status codes, content types, JSON shapes,
websocket message sequences and log lines.
"""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from machine.standin import STANDIN_COMFYUI_VERSION
from tests.support import recording

from .conftest import StandIn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEADLINE_S = 10.0

GOOD_NODE = """
from aiohttp import web
from server import PromptServer


@PromptServer.instance.routes.get("/good_node/ping")
async def ping(request):
    return web.json_response({"pong": True})


class TestPassThrough:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"image": ("IMAGE",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, image, strength):
        return (image,)


NODE_CLASS_MAPPINGS = {"TestPassThrough": TestPassThrough}
NODE_DISPLAY_NAME_MAPPINGS = {"TestPassThrough": "Test Pass Through"}
WEB_DIRECTORY = "./js"
"""


# ----------------------------------------------------------------------------- helpers


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, str]:
    """GET (or ``method=``) a URL: ``(status, json-or-bytes body, content type or '')``."""
    method = kwargs.pop("method", "GET")
    async with session.request(method, url, **kwargs) as r:
        raw = await r.read()
        content_type = r.headers.get("Content-Type", "")
        body: Any = json.loads(raw) if content_type.startswith("application/json") else raw
        return r.status, body, content_type


async def wait_history(session: aiohttp.ClientSession, standin: StandIn, prompt_id: str) -> Any:
    """Poll ``/history/{id}`` until the prompt has finished; returns its entry."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        _, body, _ = await fetch(session, f"{standin.url}/history/{prompt_id}")
        if body:
            return body[prompt_id]
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not finish:\n{standin.stderr}")


async def ws_until_done(
    ws: aiohttp.ClientWebSocketResponse, prompt_id: str
) -> list[dict[str, Any]]:
    """Collect websocket messages until ``executing`` with node None for ``prompt_id``."""
    messages: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=DEADLINE_S)
        if msg.type == aiohttp.WSMsgType.BINARY:
            messages.append({"frame": "binary", "bytes": msg.data})
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        messages.append(data)
        done = data["type"] == "executing" and data["data"]["node"] is None
        if done and data["data"]["prompt_id"] == prompt_id:
            return messages


def recorded_types(name: str) -> list[str]:
    """The message types of a recorded websocket session (text frames only)."""
    return [m["type"] for m in recording(name)["messages"] if m["frame"] == "text"]


def without_combos(info: Any) -> Any:
    """An object_info entry with every combo option list emptied (they depend on files)."""
    info = copy.deepcopy(info)
    for node in info.values():
        for section in ("required", "optional"):
            for spec in node["input"].get(section, {}).values():
                if isinstance(spec[0], list):
                    spec[0] = []
    return info


def without_tracebacks(obj: Any) -> Any:
    """Drop ``traceback`` keys (file paths and line numbers differ from ComfyUI's)."""
    if isinstance(obj, dict):
        return {k: without_tracebacks(v) for k, v in obj.items() if k != "traceback"}
    if isinstance(obj, list):
        return [without_tracebacks(v) for v in obj]
    return obj


def key_types(obj: Any) -> Any:
    """The shape of a JSON value: keys and value types, recursively."""
    if isinstance(obj, dict):
        return {k: key_types(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [key_types(v) for v in obj[:1]]
    return type(obj).__name__


# ----------------------------------------------------------------------------- process


def test_startup_log_and_speed(start_standin: Any) -> None:
    standin = start_standin()
    elapsed = standin.wait_ready()
    assert elapsed < 2.0  # about 0.2 s on 2 cores; generous for loaded CI machines

    lines = standin.stderr.splitlines()
    assert lines[:2] == [
        f"Setting output directory to: {standin.output_dir}",
        f"Setting input directory to: {standin.input_dir}",
    ]
    assert "Device: cpu" in lines
    assert f"ComfyUI version: {STANDIN_COMFYUI_VERSION}" in lines
    i = lines.index("Import times for custom nodes:")
    assert lines[i - 1] == ""
    assert lines[i + 1] == f"   0.0 seconds: {standin.root}/custom_nodes/websocket_image_save.py"
    assert lines[i + 2] == ""
    assert lines[-3:] == [
        "Starting server",
        "",
        f"To see the GUI go to: http://127.0.0.1:{standin.port}",
    ]
    assert standin.stdout == ""  # logs go to stderr, like ComfyUI


def test_sigint_stops_cleanly(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    sent = time.monotonic()
    standin.proc.send_signal(signal.SIGINT)
    assert standin.wait_exit(timeout=5) == 0
    assert time.monotonic() - sent < 1.5
    assert standin.stderr.endswith("\n\nStopped server\n")


def test_sigterm_kills_at_once(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    standin.proc.send_signal(signal.SIGTERM)
    assert standin.wait_exit(timeout=5) == -signal.SIGTERM
    assert "Stopped server" not in standin.stderr


def test_port_taken_fails_at_bind(shared_standin: StandIn, start_standin: Any) -> None:
    second = start_standin(name="second", port=shared_standin.port)
    assert second.wait_exit(timeout=DEADLINE_S) == 1
    err = second.stderr
    assert "Starting server" in err
    assert "To see the GUI" not in err
    assert "Traceback (most recent call last):" in err
    assert (
        f"error while attempting to bind on address ('127.0.0.1', {shared_standin.port}): "
        "address already in use"
    ) in err
    shared_standin.wait_ready(timeout=2)  # the first instance keeps serving


def test_unknown_flag_is_an_argparse_error(start_standin: Any) -> None:
    standin = start_standin("--no-such-flag")
    assert standin.wait_exit(timeout=DEADLINE_S) == 2
    assert "main.py: error: unrecognized arguments: --no-such-flag" in standin.stderr


def test_startup_delay_knob(start_standin: Any) -> None:
    standin = start_standin(env={"COMFYUI_STANDIN_STARTUP_DELAY": "0.4"})
    assert standin.wait_ready() >= 0.4


async def test_gc_pause_knob_holds_requests_after_the_first_prompt_only(
    start_standin: Any,
) -> None:
    """Like ComfyUI's, the first prompt ends in a garbage collection that holds the GIL (the
    knob says how long), the next one within 10 s in none."""
    standin = start_standin(env={"COMFYUI_STANDIN_GC_PAUSE": "1.0"})
    standin.wait_ready()
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                      "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    async with aiohttp.ClientSession() as session:
        elapsed = []
        for _ in range(2):
            started = time.monotonic()
            _, body, _ = await fetch(
                session, standin.url + "/prompt", method="POST", json={"prompt": prompt}
            )
            await wait_history(session, standin, body["prompt_id"])
            await fetch(session, standin.url + "/system_stats")  # behind the collection
            elapsed.append(time.monotonic() - started)
    assert elapsed[0] >= 1.0 and elapsed[1] < 0.5, elapsed


# ----------------------------------------------------------------------------- GET API


async def test_system_stats_shape(shared_standin: StandIn) -> None:
    recorded = recording("GET_system_stats.json")
    async with aiohttp.ClientSession() as session:
        status, body, content_type = await fetch(session, shared_standin.url + "/system_stats")
    assert (status, content_type) == (recorded["status"], recorded["content_type"])
    assert key_types(body) == key_types(recorded["body"])
    system, device = body["system"], body["devices"][0]
    assert system["comfyui_version"] == STANDIN_COMFYUI_VERSION
    assert 0 < system["ram_free"] <= system["ram_total"]
    assert "--port" in system["argv"]
    assert (device["name"], device["type"], device["index"]) == ("cpu", "cpu", None)


@pytest.mark.parametrize(
    "name",
    [
        "GET_queue.json",
        "GET_prompt.json",
        "GET_embeddings.json",
        "GET_extensions.json",
        "GET_features.json",
        "GET_models.json",
        "GET_models_checkpoints.json",
        "GET_object_info_EmptyImage.json",
        "GET_object_info_SaveImage.json",
        "GET_object_info_CheckpointLoaderSimple.json",
        "GET_object_info_UNETLoader.json",
        "GET_object_info_NoSuchNode.json",
        "GET_view_missing_file.json",
        "GET_view_missing_file_no_type.json",
        "GET_view_no_filename.json",
        "GET_view_path_traversal.json",
        "GET_history_unknown_prompt_id.json",
        "GET_models_unknown_folder.json",
        "GET_unknown_route.json",
    ],
)
async def test_get_matches_recording(shared_standin: StandIn, name: str) -> None:
    recorded = recording(name)
    path = recorded["request"]["path"]
    async with aiohttp.ClientSession() as session:
        status, body, content_type = await fetch(session, shared_standin.url + path)
        api_status, api_body, _ = await fetch(session, shared_standin.url + "/api" + path)
    assert status == recorded["status"]
    assert (content_type or None) == recorded["content_type"]
    assert (body.decode() if isinstance(body, bytes) else body) == recorded["body"]
    assert (api_status, api_body) == (status, body)  # /api alias: same answer


async def test_builtin_object_info_matches_recording(shared_standin: StandIn) -> None:
    recorded = recording("GET_object_info_standin_nodes.json")["body"]
    async with aiohttp.ClientSession() as session:
        status, body, _ = await fetch(session, shared_standin.url + "/object_info")
    assert status == 200
    assert {"EmptyImage", "SaveImage", "CheckpointLoaderSimple", "UNETLoader", "LoraLoader",
            "VAELoader", "SaveImageWebsocket"} <= set(body)  # fmt: skip
    for name, info in body.items():
        assert without_combos({name: info}) == without_combos({name: recorded[name]}), name
    # Same relative order as ComfyUI's own node mapping.
    assert list(body) == sorted(body, key=list(recorded).index)


async def test_internal_routes_have_no_api_alias(shared_standin: StandIn) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/internal/logs", "/internal/logs/raw", "/internal/folder_paths"):
            status, _, content_type = await fetch(session, shared_standin.url + path)
            assert (status, content_type) == (200, "application/json; charset=utf-8")
            status, _, _ = await fetch(session, shared_standin.url + "/api" + path)
            assert status == 404
        for path in ("/system_stats/", "/object_info/"):
            status, body, _ = await fetch(session, shared_standin.url + path)
            assert (status, body) == (404, b"")
        _, raw, _ = await fetch(session, shared_standin.url + "/internal/logs/raw")
        assert set(raw) == {"entries", "size"} and set(raw["size"]) == {"cols", "rows"}
        assert any(e["m"] == "Device: cpu\n" for e in raw["entries"])
        _, text, _ = await fetch(session, shared_standin.url + "/internal/logs")
        assert " - Device: cpu\n" in text


# ----------------------------------------------------------------------------- prompts


async def test_smoke_prompt_ws_history_and_view(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    body = recording("POST_prompt_smoke.json")["request"]["json_body"]
    client_id = body["client_id"]
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{standin.url}/ws?clientId={client_id}") as ws:
            first = json.loads((await ws.receive(timeout=DEADLINE_S)).data)
            idle = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}
            assert first == {"type": "status", "data": idle}

            status, posted, _ = await fetch(
                session, standin.url + "/prompt", method="POST", json=body
            )
            assert status == 200
            assert set(posted) == {"prompt_id", "number", "node_errors"}
            assert (posted["number"], posted["node_errors"]) == (0, {})
            messages = [first, *await ws_until_done(ws, posted["prompt_id"])]
            assert [m["type"] for m in messages] == recorded_types("ws_messages_smoke.json")

            # The identical prompt again is fully cached: same file, nothing re-run.
            status, again, _ = await fetch(
                session, standin.url + "/prompt", method="POST", json=body
            )
            assert (status, again["number"]) == (200, 1)
            cached = await ws_until_done(ws, again["prompt_id"])
            assert [m["type"] for m in cached] == recorded_types(
                "ws_messages_smoke_repeat_cached.json"
            )[1:]

        entry = await wait_history(session, standin, posted["prompt_id"])
        recorded = recording("GET_history_smoke_prompt_id.json")["body"]
        recorded_entry = next(iter(recorded.values()))
        assert key_types(entry) == key_types(recorded_entry)
        assert entry["prompt"][2:] == recorded_entry["prompt"][2:]
        assert entry["outputs"] == recorded_entry["outputs"]
        assert entry["meta"] == recorded_entry["meta"]
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start", "execution_cached", "execution_success",
        ]  # fmt: skip
        assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("success", True)

        png = (standin.output_dir / "smoke_00001_.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert not (standin.output_dir / "smoke_00002_.png").exists()
        view_path = recording("GET_view_smoke_output.json")["request"]["path"]
        status, viewed, content_type = await fetch(session, standin.url + view_path)
        assert (status, content_type, viewed) == (200, "image/png", png)


async def test_save_image_naming_and_subfolder(shared_standin: StandIn) -> None:
    (shared_standin.output_dir / "foo" / "bar").mkdir(parents=True)
    (shared_standin.output_dir / "foo" / "bar_00007_.png").write_bytes(b"")
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 4, "batch_size": 2, "color": 0xFF0000},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "foo/bar", "images": ["1", 0]},
        },
    }
    async with aiohttp.ClientSession() as session:
        _, posted, _ = await fetch(
            session, shared_standin.url + "/prompt", method="POST", json={"prompt": prompt}
        )
        entry = await wait_history(session, shared_standin, posted["prompt_id"])
        assert entry["outputs"]["2"]["images"] == [
            {"filename": "bar_00008_.png", "subfolder": "foo", "type": "output"},
            {"filename": "bar_00009_.png", "subfolder": "foo", "type": "output"},
        ]
        status, png, _ = await fetch(
            session, shared_standin.url + "/view?filename=bar_00009_.png&subfolder=foo&type=output"
        )
    assert status == 200 and png.startswith(PNG_SIGNATURE)
    assert png == (shared_standin.output_dir / "foo" / "bar_00009_.png").read_bytes()


ERROR_CASES = [
    "POST_prompt_err_missing_checkpoint.json",
    "POST_prompt_err_unknown_class_type.json",
    "POST_prompt_err_no_output_node.json",
    "POST_prompt_err_bad_input_values.json",
    "POST_prompt_err_link_to_missing_node.json",
    "POST_prompt_err_malformed_json.json",
    "POST_prompt_err_empty_body.json",
    "POST_prompt_err_no_prompt_key.json",
    "POST_prompt_err_prompt_is_list.json",
]


@pytest.mark.parametrize("name", ERROR_CASES)
async def test_prompt_error_matches_recording(shared_standin: StandIn, name: str) -> None:
    recorded = recording(name)
    request = recorded["request"]
    kwargs: dict[str, Any] = (
        {"json": request["json_body"]}
        if "json_body" in request
        else {"data": request["raw_body"].encode()}
    )
    async with aiohttp.ClientSession() as session:
        status, body, content_type = await fetch(
            session, shared_standin.url + "/prompt", method="POST", **kwargs
        )
    assert (status, content_type) == (recorded["status"], recorded["content_type"])
    if isinstance(body, bytes):
        assert body.decode() == recorded["body"]
    else:
        assert without_tracebacks(body) == without_tracebacks(recorded["body"])


async def test_validation_failure_log_lines(shared_standin: StandIn) -> None:
    body = recording("POST_prompt_err_bad_input_values.json")["request"]["json_body"]
    async with aiohttp.ClientSession() as session:
        status, _, _ = await fetch(
            session, shared_standin.url + "/prompt", method="POST", json=body
        )
    assert status == 400
    expected = """got prompt
Failed to validate prompt for output 2:
* EmptyImage 1:
  - Required input is missing: color
  - Value -5 smaller than min of 1: height
  - Failed to convert an input value to a INT value: width, abc, invalid literal for int() with base 10: 'abc'
Output will be ignored
invalid prompt: {'type': 'prompt_outputs_failed_validation', 'message': 'Prompt outputs failed validation', 'details': '', 'extra_info': {}}
"""  # noqa: E501
    assert expected in shared_standin.stderr


async def test_queue_while_running_interrupt_and_clear(start_standin: Any) -> None:
    standin = start_standin()
    standin.wait_ready()
    slow = [recording(f"POST_prompt_slow_{i}.json")["request"]["json_body"] for i in (1, 2)]
    recorded_queue = recording("GET_queue_while_running.json")["body"]
    async with aiohttp.ClientSession() as session:
        ids = []
        for body in slow:
            _, posted, _ = await fetch(session, standin.url + "/prompt", method="POST", json=body)
            ids.append(posted["prompt_id"])
        deadline = time.monotonic() + DEADLINE_S
        while True:
            _, queue, _ = await fetch(session, standin.url + "/queue")
            if queue["queue_running"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert key_types(queue) == key_types(recorded_queue)
        running, pending = queue["queue_running"][0], queue["queue_pending"][0]
        assert running[:2] == [0, ids[0]] and pending[:2] == [1, ids[1]]
        assert running[2:] == recorded_queue["queue_running"][0][2:]
        assert pending[2:] == recorded_queue["queue_pending"][0][2:]
        _, info, _ = await fetch(session, standin.url + "/prompt")
        assert info == recording("GET_prompt_while_running.json")["body"]

        for path, payload in (("/queue", {"clear": True}), ("/interrupt", {})):
            status, empty, content_type = await fetch(
                session, standin.url + path, method="POST", json=payload
            )
            assert (status, empty, content_type) == (200, b"", "")
        entry = await wait_history(session, standin, ids[0])
        assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        _, queue, _ = await fetch(session, standin.url + "/queue")
        assert queue == {"queue_running": [], "queue_pending": []}

        status, one, _ = await fetch(session, standin.url + "/history?max_items=1")
        assert status == 200 and list(one) == [ids[0]]
        await fetch(session, standin.url + "/history", method="POST", json={"clear": True})
        _, history, _ = await fetch(session, standin.url + "/history")
        assert history == {}
    assert "Global interrupt (no prompt_id specified)" in standin.stderr


async def test_upload_and_view_input(shared_standin: StandIn) -> None:
    png = PNG_SIGNATURE + b"rest of an image"
    async with aiohttp.ClientSession() as session:
        names = []
        for content in (png, png, b"other content"):
            form = aiohttp.FormData()
            form.add_field("image", content, filename="lab_upload.png", content_type="image/png")
            form.add_field("type", "input")
            status, body, _ = await fetch(
                session, shared_standin.url + "/upload/image", method="POST", data=form
            )
            assert status == 200
            names.append(body)
        assert names[0] == recording("POST_upload_image.json")["body"]
        assert names[1] == recording("POST_upload_image_repeat.json")["body"]
        assert names[2]["name"] == "lab_upload (1).png"
        status, viewed, content_type = await fetch(
            session, shared_standin.url + "/view?filename=lab_upload.png&type=input"
        )
    assert (status, content_type, viewed) == (200, "image/png", png)


# ----------------------------------------------------------------------------- custom nodes


async def test_custom_nodes_loaded_and_failures_reported(start_standin: Any) -> None:
    standin = start_standin(
        custom_nodes={
            "good_node/__init__.py": GOOD_NODE,
            "good_node/js/good.js": "// test\n",
            "broken_node/__init__.py": "import os\nimport nonexistent_dep  # noqa: F401\n",
            "skipped.py.disabled": "raise RuntimeError('must not be imported')\n",
            "readme.txt": "not a module\n",
        }
    )
    standin.wait_ready()
    nodes_dir = standin.root / "custom_nodes"
    err = standin.stderr
    lines = err.splitlines()
    assert f"   0.0 seconds (IMPORT FAILED): {nodes_dir}/broken_node" in lines
    assert f"   0.0 seconds: {nodes_dir}/good_node" in lines
    cannot = f"Cannot import {nodes_dir}/broken_node module for custom nodes: No module named 'nonexistent_dep'"  # noqa: E501
    assert cannot in lines
    # The traceback comes first, then a blank line, then the "Cannot import" line.
    i = lines.index(cannot)
    assert lines[i - 2 : i] == ["ModuleNotFoundError: No module named 'nonexistent_dep'", ""]
    assert "Traceback (most recent call last):" in lines[:i]
    assert "must not be imported" not in err
    block = lines.index("Import times for custom nodes:")
    entries = lines[block + 1 : lines.index("", block)]
    assert len(entries) == 3 and all(e.startswith("   ") for e in entries)

    async with aiohttp.ClientSession() as session:
        _, info, _ = await fetch(session, standin.url + "/object_info/TestPassThrough")
        node = info["TestPassThrough"]
        assert (node["python_module"], node["display_name"]) == (
            "custom_nodes.good_node",
            "Test Pass Through",
        )
        assert node["input_order"] == {"required": ["image", "strength"]}
        _, extensions, _ = await fetch(session, standin.url + "/extensions")
        assert extensions[-1] == "/extensions/good_node/good.js"
        status, js, _ = await fetch(session, standin.url + "/extensions/good_node/good.js")
        assert (status, js) == (200, b"// test\n")
        for prefix in ("", "/api"):  # a route added through PromptServer.instance.routes
            status, pong, _ = await fetch(session, f"{standin.url}{prefix}/good_node/ping")
            assert (status, pong) == (200, {"pong": True})
        _, raw, _ = await fetch(session, standin.url + "/internal/logs/raw")
        logged = "".join(e["m"] for e in raw["entries"])
        assert "(IMPORT FAILED)" in logged and "Cannot import" in logged

        prompt = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0},
            },
            "2": {"class_type": "TestPassThrough", "inputs": {"image": ["1", 0], "strength": 0.5}},
            "3": {
                "class_type": "SaveImage",
                "inputs": {"filename_prefix": "custom", "images": ["2", 0]},
            },
        }
        _, posted, _ = await fetch(
            session, standin.url + "/prompt", method="POST", json={"prompt": prompt}
        )
        entry = await wait_history(session, standin, posted["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    assert (standin.output_dir / "custom_00001_.png").read_bytes().startswith(PNG_SIGNATURE)


# ----------------------------------------------------------------------------- models


async def test_extra_model_paths_and_runtime_error(start_standin: Any, tmp_path: Path) -> None:
    models = tmp_path / "lab_models"
    (models / "checkpoints" / "sub").mkdir(parents=True)
    (models / "loras").mkdir()
    (models / "checkpoints" / "test.safetensors").write_bytes(bytes(range(256)) * 4)
    (models / "checkpoints" / "sub" / "nested.ckpt").write_bytes(b"xx")
    (models / "checkpoints" / "ignored.txt").write_text("not a model")
    (models / "loras" / "tiny_lora.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        f"lab:\n    base_path: {models}\n    checkpoints: checkpoints\n"
        "    loras: |\n        loras\n        more_loras\n"
    )
    standin = start_standin("--extra-model-paths-config", str(config), "--disable-auto-launch")
    standin.wait_ready()
    lines = standin.stderr.splitlines()
    assert lines[:3] == [
        f"Adding extra search path checkpoints {models}/checkpoints",
        f"Adding extra search path loras {models}/loras",
        f"Adding extra search path loras {models}/more_loras",
    ]

    async with aiohttp.ClientSession() as session:
        for name in (
            "GET_models_checkpoints_extra_paths.json",
            "GET_models_loras_extra_paths.json",
            "GET_object_info_CheckpointLoaderSimple_extra_paths.json",
            "GET_object_info_LoraLoader_extra_paths.json",
        ):
            recorded = recording(name)
            _, body, _ = await fetch(session, standin.url + recorded["request"]["path"])
            assert body == recorded["body"], name

        _, folders, _ = await fetch(session, standin.url + "/internal/folder_paths")
        assert folders["checkpoints"] == [
            f"{standin.root}/models/checkpoints",
            f"{models}/checkpoints",
            f"{standin.output_dir}/checkpoints",
        ]
        # Read at request time: a file that appears later is listed.
        (models / "checkpoints" / "later.sft").write_bytes(b"")
        _, listed, _ = await fetch(session, standin.url + "/models/checkpoints")
        assert listed == ["later.sft", "sub/nested.ckpt", "test.safetensors"]

        # The fake checkpoint passes validation and fails when loaded, as in ComfyUI.
        body = recording("POST_prompt_runtime_error_fake_checkpoint.json")["request"]["json_body"]
        async with session.ws_connect(f"{standin.url}/ws?clientId={body['client_id']}") as ws:
            first = json.loads((await ws.receive(timeout=DEADLINE_S)).data)
            status, posted, _ = await fetch(
                session, standin.url + "/prompt", method="POST", json=body
            )
            assert status == 200
            messages = [first, *await ws_until_done(ws, posted["prompt_id"])]
        expected = recording("ws_messages_runtime_error_fake_checkpoint.json")["messages"]
        assert [m["type"] for m in messages] == [m["type"] for m in expected]
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        recorded_error = next(m["data"] for m in expected if m["type"] == "execution_error")
        assert list(error) == list(recorded_error)
        for key in (
            "node_id",
            "node_type",
            "executed",
            "exception_message",
            "exception_type",
            "current_inputs",
        ):
            assert error[key] == recorded_error[key], key
        entry = await wait_history(session, standin, posted["prompt_id"])
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert (entry["outputs"], entry["meta"]) == ({}, {})
    assert (
        "!!! Exception during processing !!! Error while deserializing header: header too large"
        in standin.stderr
    )


async def test_save_image_websocket_sends_binary_png(shared_standin: StandIn) -> None:
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    url = shared_standin.url
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/ws?clientId=ws-node") as ws,
    ):
        await ws.receive(timeout=DEADLINE_S)
        body = {"prompt": prompt, "client_id": "ws-node"}
        _, posted, _ = await fetch(session, url + "/prompt", method="POST", json=body)
        messages = await ws_until_done(ws, posted["prompt_id"])
    frames = [m["bytes"] for m in messages if m.get("frame") == "binary"]
    assert len(frames) == 1
    # As recorded: event 1 (preview image), format 2 (PNG), then the PNG itself.
    assert frames[0][:8].hex() == "0000000100000002"
    assert frames[0][8:16] == PNG_SIGNATURE
    assert "execution_success" in [m.get("type") for m in messages]


async def test_txt2img_workflow_with_a_valid_checkpoint(start_standin: Any) -> None:
    standin = start_standin()
    checkpoints = standin.output_dir / "checkpoints"  # the output dir is a model search path
    checkpoints.mkdir()
    header = b'{"__metadata__":{"format":"pt"}}'
    (checkpoints / "tiny.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    standin.wait_ready()
    sampler = {"seed": 1, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 32, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                **sampler,
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i", "images": ["8", 0]}},
    }
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{standin.url}/ws?clientId=t2i") as ws:
            await ws.receive(timeout=DEADLINE_S)
            body = {"prompt": prompt, "client_id": "t2i"}
            _, posted, _ = await fetch(session, standin.url + "/prompt", method="POST", json=body)
            messages = await ws_until_done(ws, posted["prompt_id"])
        entry = await wait_history(session, standin, posted["prompt_id"])
    steps = [m["data"] for m in messages if m["type"] == "progress"]
    assert [(s["value"], s["max"], s["node"]) for s in steps] == [
        (1, 3, "3"),
        (2, 3, "3"),
        (3, 3, "3"),
    ]
    assert entry["status"]["status_str"] == "success"
    png = (standin.output_dir / "t2i_00001_.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert png[16:24] == (64).to_bytes(4, "big") + (32).to_bytes(4, "big")  # IHDR size
