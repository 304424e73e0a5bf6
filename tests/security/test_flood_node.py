"""Issue 17, point 3 on a real node (`comfy-machine up` with a supervised stand-in): a flood
of silent, half-sent and idle keep-alive connections on the health port never fails the node,
never stops its instance, never takes the agent's descriptors past the cap, and the node
answers again by itself once the timeouts clear it. The agent runs with its soft open-files
limit raised to the hard one."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Callable

import psutil

from health.limits import HealthLimits
from tests.support import Node, wait_until

CAP, FLOOD, IDLE_S = 50, 200, 2
HEAD_S = HealthLimits().header_timeout  # not a setting: the product's 5 s
TOKEN = "flood-test-token-0123456789"
HALF_SENT = b"GET /health/comfyui HTTP/1.1\r\nHost: localhost\r\n"


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (what it sent before is read and dropped)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def keep_alive_get(port: int, path: str) -> socket.socket:
    """A connection that got its answer to one keep-alive GET and now sits idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return sock


def health_status(node: Node) -> int | None:
    try:
        return node.get("/health/comfyui", timeout=2)[0]
    except OSError:  # refused at the cap and reset
        return None


def test_a_flood_never_fails_the_node_nor_stops_its_instance(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(gpus=1, MACHINE_HEALTH_MAX_CONNECTIONS=str(CAP),
                     MACHINE_HEALTH_IDLE_TIMEOUT=str(IDLE_S), MACHINE_HEALTH_TOKEN=TOKEN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The agent starts with a low soft limit (as under many container runtimes) and raises it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        node.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    node.wait_ready()
    assert node.proc is not None
    agent = psutil.Process(node.proc.pid)
    agent_soft, agent_hard = agent.rlimit(psutil.RLIMIT_NOFILE)
    assert agent_hard == hard and (agent_soft == hard or hard == resource.RLIM_INFINITY)
    _, before = node.instance(0)
    fds_before = agent.num_fds()

    flood: list[socket.socket] = []
    try:
        started = time.monotonic()
        for i in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", node.health_port), timeout=5)
            flood.append(sock)
            if i % 2:
                sock.sendall(HALF_SENT)
        # Past the cap, connections are closed at once; the agent holds no more than the cap.
        wait_until(lambda: sum(closed_by_server(s) for s in flood) >= FLOOD - CAP, 3,
                   "connections past the cap closed at once")
        assert agent.num_fds() <= fds_before + CAP + 10, agent.num_fds()
        # The head timeout clears the flood and the node answers again by itself.
        wait_until(lambda: health_status(node) == 200, HEAD_S + 5, "health answering again")
        assert time.monotonic() - started < HEAD_S + 5
        wait_until(lambda: all(closed_by_server(s) for s in flood), 5, "the whole flood closed")
    finally:
        for sock in flood:
            sock.close()

    idle: list[socket.socket] = []
    try:
        idle = [keep_alive_get(node.health_port, "/livez") for _ in range(CAP)]
        started = time.monotonic()
        assert health_status(node) in (503, None)  # the cap holds: turned away, not hanging
        wait_until(lambda: all(closed_by_server(s) for s in idle), IDLE_S + 3,
                   "idle keep-alive connections closed after MACHINE_HEALTH_IDLE_TIMEOUT")
        assert time.monotonic() - started > IDLE_S - 0.5
        wait_until(lambda: health_status(node) == 200, 3, "health answering again")
    finally:
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()

    # Nothing happened to the node: same instance process, no restart, no failure.
    code, after = node.instance(0)
    assert code == 200 and after["pid"] == before["pid"] and after["ready"]
    assert after["restarts"] == before["restarts"]
    assert node.get("/health/comfyui")[1]["status"] == "ready"
    log = node.log_path.read_text()
    assert "background task failed" not in log and "Too many open files" not in log
    assert "refused at the cap" in log
    assert TOKEN not in log  # a secret: never logged
