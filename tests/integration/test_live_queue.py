"""Live queue (issue 13, point 5), end to end: a real node, real supervisord, a stand-in
instance. With ``PROBE_INTERVAL=30`` no HTTP probe runs while the test watches (checked:
``last_probe`` does not move), so only the instance's websocket ``status`` events
(services/queue_feed.py) can explain health following the queue: ``queue_running``,
``queue_pending``, ``accepting`` and the metrics within 100 ms of each change, compared with
the prompts' own times in ``/history``. A new process gets a new socket."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.integration.test_drain import post_prompt, slow_prompt
from tests.support import Node, http_json, wait_until

LATENCY_S = 0.1


def history_entry(url: str, prompt_id: str) -> dict[str, Any] | None:
    code, body = http_json(f"{url}/history/{prompt_id}", timeout=5)
    return body.get(prompt_id) if code == 200 else None


def event_time(entry: dict[str, Any], kind: str) -> float:
    """Unix time of a history status message (ComfyUI's timestamps are in milliseconds)."""
    return next(data["timestamp"] for name, data in entry["status"]["messages"]
                if name == kind) / 1000


def queue_metric(node: Node, name: str) -> float:
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    line = next(x for x in text.splitlines()
                if x.startswith(f"comfy_machine_instance_queue_{name}{{"))
    return float(line.rsplit(" ", 1)[1])


def watch(node: Node, until: Callable[[dict[str, Any]], bool], timeout: float
          ) -> list[tuple[float, int, tuple[int | None, int | None], bool]]:
    """Poll the instance entry every few ms: (time seen, code, (running, pending), accepting)
    each time it changes, until ``until(entry)``."""
    seen: list[tuple[float, int, tuple[int | None, int | None], bool]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, inst = node.instance(0)
        at = time.time()  # after the answer came: the latency measured is never too short
        key = (inst["queue_running"], inst["queue_pending"])
        if not seen or (seen[-1][1], seen[-1][2], seen[-1][3]) != (code, key, inst["accepting"]):
            seen.append((at, code, key, inst["accepting"]))
        if until(inst):
            return seen
        time.sleep(0.003)
    raise AssertionError(f"timed out; seen {seen}")


def first_seen(
    seen: list[Any], key: tuple[int, int], after: float = 0.0
) -> tuple[float, int, bool]:
    """When ``key`` (running, pending) was first seen after ``after``, with code, accepting."""
    at, code, _, accepting = next(s for s in seen if s[2] == key and s[0] > after)
    return at, code, accepting


def test_queue_figures_follow_the_websocket(make_node: Callable[..., Node]) -> None:
    node = make_node(gpus=1, PROBE_INTERVAL="30", MAX_QUEUE_DEPTH="2").start()
    body = node.wait_ready(90)
    url = body["instances"][0]["url"]
    code, inst = wait_until(lambda: (r := node.instance(0))[1]["queue_running"] == 0 and r, 10,
                            "the smoke prompt's queue figures back to 0")
    assert (code, inst["queue_pending"], inst["accepting"]) == (200, 0, True), inst
    probed_at = inst["last_probe"]["at"]

    first = post_prompt(url, slow_prompt(2))  # ~3 s
    second = post_prompt(url, slow_prompt(1))  # queued behind it
    posted = time.time()
    seen = watch(node, lambda i: i["queue_running"] == 1 and i["queue_pending"] == 1, 10)
    at, code, accepting = first_seen(seen, (1, 1))
    both_at = at
    assert at - posted < LATENCY_S, f"1 running + 1 queued showed {at - posted:.3f}s late"
    # MAX_QUEUE_DEPTH=2: two prompts in its queue, so it takes no more work.
    assert (code, accepting) == (503, False), seen
    assert queue_metric(node, "running") == 1 and queue_metric(node, "pending") == 1

    seen += watch(node, lambda i: i["queue_running"] == 0 and i["queue_pending"] == 0, 60)
    done_first = history_entry(url, first)
    done_second = history_entry(url, second)
    assert done_first and done_second
    assert done_first["status"]["status_str"] == done_second["status"]["status_str"] == "success"

    # The first prompt finished: 1 running (the second), 0 queued, accepting again.
    at, code, accepting = first_seen(seen, (1, 0), after=both_at)
    first_end_at = at
    late = at - event_time(done_first, "execution_success")
    assert late < LATENCY_S, f"the first prompt's end showed {late:.3f}s late; seen {seen}"
    assert (code, accepting) == (200, True), seen
    # The second finished: nothing running, within 100 ms of its completion in /history.
    at, code, accepting = first_seen(seen, (0, 0), after=first_end_at)
    late = at - event_time(done_second, "execution_success")
    assert late < LATENCY_S, f"queue_running 0 showed {late:.3f}s late; seen {seen}"
    assert (code, accepting) == (200, True)
    assert queue_metric(node, "running") == 0 and queue_metric(node, "pending") == 0
    # No HTTP probe ran meanwhile: the websocket alone explains all of it.
    assert node.instance(0)[1]["last_probe"]["at"] == probed_at

    # A new process: a new socket follows it.
    old_pid = body["instances"][0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: (i := node.instance(0)[1])["ready"] and i["pid"] != old_pid, 60,
               "the instance ready again with a new pid")
    wait_until(lambda: node.instance(0)[1]["queue_running"] == 0, 10, "the new smoke done")
    probed_at = node.instance(0)[1]["last_probe"]["at"]
    third = post_prompt(url, slow_prompt(1))
    posted = time.time()
    seen = watch(node, lambda i: i["queue_running"] == 1, 10)
    running_at = first_seen(seen, (1, 0))[0]
    assert running_at - posted < LATENCY_S, seen
    seen = watch(node, lambda i: i["queue_running"] == 0, 30)
    done_third = history_entry(url, third)
    assert done_third
    late = first_seen(seen, (0, 0), after=running_at)[0] - event_time(
        done_third, "execution_success"
    )
    assert late < LATENCY_S, f"queue_running 0 showed {late:.3f}s late; seen {seen}"
    assert node.instance(0)[1]["last_probe"]["at"] == probed_at

    # It stops cleanly: every socket closed with its process, nothing failed on the way.
    assert node.stop() == 0, node.log()
    log = node.log_path.read_text()
    assert "queue feed failed" not in log and "Traceback" not in log, log[-4000:]
