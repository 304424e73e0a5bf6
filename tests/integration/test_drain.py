"""Drain before stop (issue 13, point 4), end to end: a real node, real supervisord, stand-in
instances and real signals. A prompt running at SIGTERM finishes (``success`` in its history)
before its instance stops; health says ``draining`` meanwhile; a second SIGTERM stops at once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import Node, http_json, wait_until


def slow_prompt(batch: int) -> dict[str, Any]:
    """EmptyImage 1024x1024 x ``batch`` -> ImageBlur r=31 -> SaveImage (the recorded slow
    prompt, POST_prompt_slow_1.json): about 1.5 s per image on the stand-in."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 1024, "height": 1024, "batch_size": batch, "color": 0}},
        "2": {"class_type": "ImageBlur",
              "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 5.0}},
        "3": {"class_type": "SaveImage",
              "inputs": {"filename_prefix": "drain", "images": ["2", 0]}},
    }


def post_prompt(url: str, prompt: dict[str, Any]) -> str:
    data = json.dumps({"prompt": prompt, "client_id": "drain-test"}).encode()
    request = urllib.request.Request(
        url + "/prompt", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)["prompt_id"]


def running(url: str) -> bool:
    code, body = http_json(url + "/queue")
    return code == 200 and len(body["queue_running"]) == 1


def history_status(url: str, prompt_id: str) -> str | None:
    code, body = http_json(f"{url}/history/{prompt_id}", timeout=5)
    entry = body.get(prompt_id) if code == 200 else None
    return entry["status"]["status_str"] if entry else None


def _booted(make_node: Callable[..., Node]) -> tuple[Node, str]:
    node = make_node(gpus=1, DRAIN_TIMEOUT="120").start()
    body = node.wait_ready(90)
    return node, body["instances"][0]["url"]


def test_prompt_running_at_sigterm_finishes_before_its_instance_stops(
    make_node: Callable[..., Node],
) -> None:
    node, url = _booted(make_node)
    prompt_id = post_prompt(url, slow_prompt(3))
    wait_until(lambda: running(url), 10, "the slow prompt running")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # Health stops accepting at once: /readyz, the node and the instance say draining.
    code, body = wait_until(
        lambda: (r := node.get("/readyz", timeout=2))[1].get("status") == "draining" and r,
        5, "readyz draining",
    )
    seen_after = time.monotonic() - signalled
    assert code == 503 and body["accepting"] is False, body
    assert seen_after < 1.0, f"draining showed {seen_after:.3f}s after SIGTERM"
    code, body = node.get("/health/comfyui")
    assert code == 503 and body["status"] == "draining" and body["phase"] == "STOPPING", body
    code, inst = node.instance(0)
    assert code == 503, inst
    assert inst["status"] == "draining" and inst["accepting"] is False, inst
    assert "draining" in inst["reasons"][0], inst

    # The prompt ends with success while its instance still answers; then the node stops.
    status = wait_until(lambda: history_status(url, prompt_id), 60, "the prompt's history")
    assert status == "success", status
    assert node.proc.wait(60) == 0, node.log()
    assert "drained" in node.log_path.read_text()


def test_second_sigterm_stops_at_once(make_node: Callable[..., Node]) -> None:
    node, url = _booted(make_node)
    post_prompt(url, slow_prompt(40))  # about a minute: far longer than the test waits
    wait_until(lambda: running(url), 10, "the slow prompt running")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: node.get("/readyz", timeout=2)[1].get("status") == "draining", 5,
               "readyz draining")
    with pytest.raises(subprocess.TimeoutExpired):  # the node must wait for the running prompt
        node.proc.wait(0.5)
    node.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert node.proc.wait(30) == 0, node.log()
    assert time.monotonic() - stopped < 15
    assert "drain cut short by a second signal" in node.log_path.read_text()
