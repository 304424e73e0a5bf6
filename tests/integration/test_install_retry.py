"""Install retries what is transient (issue 13, point 8), end to end: a custom node whose git
host refuses connections (a network failure) is retried by the running node with backoff
(INSTALL_RETRIES) and health shows the attempts; a permanent failure (a repository that is not
there) fails at once, on the first attempt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.support import Node, free_port_range, wait_until


def _installed(node: Node) -> dict[str, Any] | None:
    _, body = node.get("/health/comfyui/installation")
    return body if body["status"] in ("ready", "degraded", "failed") and not body.get(
        "next_attempt_at") and node.get("/health/comfyui")[1]["phase"] != "INSTALLING" else None


def test_a_network_failure_is_retried_and_health_shows_the_attempts(
    make_node: Callable[..., Node],
) -> None:
    port = free_port_range(1)  # nothing listens: connection refused, a transient failure
    node = make_node(
        gpus=1, COMFYUI_CUSTOM_NODES=f"http://127.0.0.1:{port}/offline-node.git",
        GIT_RETRIES="0", INSTALL_RETRIES="1",
    ).start()
    # While it waits for the retry, health says so.
    during = wait_until(
        lambda: (b := node.get("/health/comfyui/installation")[1]).get("next_attempt_at") and b,
        60, "a retry being due",
    )
    assert during["attempts"] == 1 and during["retry_error"], during
    _, node_body = node.get("/health/comfyui")
    assert "retrying (INSTALL_RETRIES)" in node_body["reasons"][0], node_body
    body = wait_until(lambda: _installed(node), 60, "the install phase over")
    assert body["attempts"] == 2, body
    (entry,) = body["custom_nodes"]
    assert entry["status"] == "failed" and entry["transient"] is True, entry
    assert '"install retry"' in node.log_path.read_text()


def test_a_permanent_failure_is_not_retried(make_node: Callable[..., Node]) -> None:
    node = make_node(
        gpus=1, COMFYUI_CUSTOM_NODES="/nonexistent/not-a-repo", INSTALL_RETRIES="3",
    ).start()
    body = wait_until(lambda: _installed(node), 60, "the install phase over")
    assert body["attempts"] == 1 and body["retry_error"] is None, body
    (entry,) = body["custom_nodes"]
    assert entry["status"] == "failed" and entry["transient"] is False, entry
    assert '"install retry"' not in node.log_path.read_text()
