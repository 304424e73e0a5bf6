"""Health latency under a connection flood (issue 17): p50/p99 of `GET /health/comfyui` for
200 well-behaved clients (bench/run.py's load) against the product's health server, first
alone, then while 5,000 idle keep-alive connections are held open on the same server, then
again once they are closed; the ratio is flood p99 / baseline p99 of the same run. Loopback
only; the counts are bounded and the whole run has a deadline.

    python bench/health_flood.py [--idle N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import CLIENTS, REQUESTS_PER_CLIENT, SERVERS, _load, percentile  # noqa: E402
from services.fdlimit import raise_fd_limit  # noqa: E402
from tests.support import free_port_range, http_json, wait_until  # noqa: E402

HOST = "127.0.0.1"  # loopback only
MAX_IDLE = 20_000
OPEN_BATCH = 500  # connections opened at once (below the server's listen backlog)
DEADLINE_S = 300.0


async def _idle_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that asked once (keep-alive), read its answer and now holds the connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET /livez HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return reader, writer


def _figures(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "rps": round(len(latencies) / wall),
    }


async def _measure(url: str) -> dict[str, float]:
    started = time.monotonic()
    latencies = await _load(url)
    return _figures(latencies, time.monotonic() - started)


async def _run(port: int, idle: int, server: psutil.Process) -> dict[str, object]:
    url = f"http://{HOST}:{port}/health/comfyui"
    results: dict[str, object] = {"clients": CLIENTS, "requests": CLIENTS * REQUESTS_PER_CLIENT,
                                  "idle_connections": idle}
    results["baseline"] = await _measure(url)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        opened = time.monotonic()
        while len(held) < idle:
            batch = min(OPEN_BATCH, idle - len(held))
            held += await asyncio.gather(*(_idle_connection(port) for _ in range(batch)))
        results["flood_open_s"] = round(time.monotonic() - opened, 2)
        results["server_fds_during_flood"] = server.num_fds()
        results["flood"] = await _measure(url)
        # The figure counts only if the flood was really held during the measurement.
        still_open = sum(not reader.at_eof() for reader, _ in held)
        results["idle_still_open_after"] = still_open
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.5)  # let the server see the closes
    results["after"] = await _measure(url)
    base, flood = results["baseline"], results["flood"]
    assert isinstance(base, dict) and isinstance(flood, dict)
    results["p99_ratio"] = round(flood["p99_ms"] / base["p99_ms"], 2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=5000, help=f"idle connections (<= {MAX_IDLE})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # Both ends need a descriptor per connection: raise the limit as the agent does (the
    # server process inherits it) and fit the flood under it.
    budget = raise_fd_limit()
    idle = max(0, min(args.idle, MAX_IDLE, budget.soft - CLIENTS - 1000))
    port = free_port_range(1)
    proc = subprocess.Popen([sys.executable, "-c", SERVERS, "health", str(port), str(ROOT)])
    try:
        wait_until(lambda: http_json(f"http://{HOST}:{port}/livez", 1)[0] == 200, 30,
                   "health server", interval=0.01)
        results = asyncio.run(
            asyncio.wait_for(_run(port, idle, psutil.Process(proc.pid)), DEADLINE_S)
        )
    finally:
        proc.terminate()
        proc.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:<24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
