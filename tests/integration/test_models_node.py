"""A real node with a model manifest and a workflow: the stand-in instance lists models from
the generated extra_model_paths.yaml, and what it does not list is reported per instance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_models_server import FileServer
from tests.support import Node, short_tmpdir, wait_until

MIB = 1 << 20


@pytest.fixture
def server() -> Iterator[FileServer]:
    root = short_tmpdir()
    srv = FileServer(root).start()
    yield srv
    srv.stop()
    shutil.rmtree(root, ignore_errors=True)


def _serve(server: FileServer, name: str, size: int) -> str:
    data = os.urandom(size)
    (server.root / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _model(url: str, folder: str, **extra: str) -> str:
    lines = [f'url = "{url}"', f'folder = "{folder}"'] + [
        f"{k} = {json.dumps(v)}" for k, v in extra.items()
    ]
    return "[[models]]\n" + "\n".join(lines) + "\n\n"


def test_workflow_file_in_the_wrong_folder_and_background_progress(
    make_node: Callable[..., Node], server: FileServer, tmp_path: Path
) -> None:
    good = _serve(server, "good.safetensors", 1000)
    _serve(server, "wrong.safetensors", 1000)
    later_sha = _serve(server, "later.safetensors", 2 * MIB)
    server.slow_delay = 0.05  # 32 pieces: ~1.6 s of visible progress
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "good.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "wrong.safetensors"}},
        "3": {
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": "wrong.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
                "model": ["1", 0],
                "clip": ["1", 1],
            },
        },
    }
    (tmp_path / "flow.json").write_text(json.dumps(workflow))
    toml = tmp_path / "machine.toml"
    toml.write_text(
        'workflows = ["flow.json"]\n\n'
        + _model(server.url("files", "good.safetensors"), "checkpoints", sha256=good)
        + _model(server.url("files", "wrong.safetensors"), "loras")
        + _model(
            server.url("slow", "later.safetensors"), "vae", when="background", sha256=later_sha
        )
    )
    node = make_node(gpus=1, MACHINE_CONFIG=str(toml)).start()
    seen = wait_until(
        lambda: (
            lambda b: (
                b
                if b["models"]
                and b["models"][2]["status"] == "downloading"
                and b["models"][2]["bytes_done"] > 0
                and b["progress"]["rate_bytes_per_s"]
                else None
            )
        )(node.get("/health/comfyui/models")[1]),
        60,
        "the background model downloading with progress",
    )
    later = seen["models"][2]
    assert later["bytes_total"] == 2 * MIB and later["rate_bytes_per_s"] > 0
    assert later["eta_s"] is not None
    # Nothing is copied per instance: the instance reads the store through the yaml.
    argv = node.workspace / "run" / "extra_model_paths.yaml"
    assert argv.is_file() and str(node.workspace / "models") in argv.read_text()
    body = node.wait_ready()  # the instance lists every required model: it serves
    assert body["instances"][0]["ready"]
    code, models = wait_until(
        lambda: (
            lambda r: (
                r
                if r[1]["models"][2]["status"] == "verified" and r[1]["instances"][0]["checked"]
                else None
            )
        )(node.get("/health/comfyui/models")),
        30,
        "the background model verified",
    )
    assert code == 503 and models["status"] == "failed"
    refs = {r["node"]: r for r in models["workflows"]}
    assert refs["1"]["listed_by"] == ["comfyui-gpu0"] and refs["3"]["missing_on"] == []
    assert refs["2"]["missing_on"] == ["comfyui-gpu0"] and refs["2"]["input"] == "ckpt_name"
    reason = next(r for r in models["reasons"] if "wrong.safetensors" in r)
    assert str(tmp_path / "flow.json") in reason and "node 2" in reason
    assert "ckpt_name" in reason and "not listed by any instance" in reason
    assert (node.workspace / "models" / "vae" / "later.safetensors").stat().st_size == 2 * MIB


def test_instance_that_does_not_list_a_required_model_is_not_ready(
    make_node: Callable[..., Node], server: FileServer, tmp_path: Path
) -> None:
    _serve(server, "q.gguf", 1000)  # ComfyUI lists no .gguf without a GGUF custom node
    toml = tmp_path / "machine.toml"
    toml.write_text(_model(server.url("files", "q.gguf"), "unet"))
    node = make_node(gpus=1, MACHINE_CONFIG=str(toml)).start()
    code, inst = wait_until(
        lambda: (lambda r: r if any("does not list" in x for x in r[1]["reasons"]) else None)(
            node.instance(0)
        ),
        60,
        "gpu 0 reporting the unlisted model",
    )
    assert code == 503 and inst["ready"] is False
    assert "'q.gguf' under diffusion_models" in inst["reasons"][0]
    code, models = node.get("/health/comfyui/models")
    # No sha256 or size in the manifest: on disk unverified, and still checked in the listing.
    assert code == 503 and models["models"][0]["status"] == "unverified"
    assert models["instances"][0]["mismatches"] == inst["reasons"]
    assert node.get("/health/comfyui")[0] == 503
