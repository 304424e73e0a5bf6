"""comfy-machine benchmarks: every figure with its baseline measured in the same run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from health_rps import SERVER  # noqa: E402  (bench/ is this script's directory)

from machine.demo import prepare_standin_repo  # noqa: E402
from tests.support import Node, free_port_range, http_json, wait_until  # noqa: E402

CLIENTS = 200
REQUESTS_PER_CLIENT = 25
STABLE_S = 1  # INSTANCE_STABLE_SECS for the bench: a crash after this long is a first crash
# Real ComfyUI 0.3.64's first prompt ends in a gc.collect() that holds its GIL this long on these
# cores (torch loaded); the stand-in imitates it, so the warm boot's smoke meets it as with ComfyUI.
FIRST_GC_PAUSE_S = "0.3"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def bare_standin_start(source: Path) -> float:
    """Seconds from spawning the stand-in to its first 200 on /system_stats."""
    port = free_port_range(1)
    out = tempfile.mkdtemp(prefix="cm-bench-")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--port", str(port), "--cpu", "--output-directory", out,
         "--input-directory", out], cwd=source, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_json(f"http://127.0.0.1:{port}/system_stats", 1)[0] == 200, 30,
                   "stand-in answering", interval=0.005)
        return time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def warm_up_to_ready(node: Node) -> float:
    started = time.monotonic()
    node.start()
    wait_until(lambda: http_json(node.url + "/health/comfyui", 1)[1].get("status") == "ready", 60,
               "node ready", interval=0.005)
    return time.monotonic() - started


def crash_to_503(node: Node) -> float:
    _, body = node.instance(0)
    killed = time.monotonic()
    os.kill(body["pid"], signal.SIGKILL)
    wait_until(lambda: node.instance(0)[0] == 503, 5, "503", interval=0.002)
    elapsed = time.monotonic() - killed
    wait_until(lambda: node.instance(0)[0] == 200, 60, "ready again", interval=0.05)
    return elapsed


def crash_to_new_pid(node: Node) -> float:
    """Seconds from ``kill -9`` of a ready instance (a first crash: it ran long enough) to its
    new process existing: supervisord's restart, nudged by the agent (issue 14)."""
    # A crash of a running instance: one that dies within supervisord's startsecs is a failed
    # start, which supervisord retries after its own backoff.
    _, body = wait_until(lambda: (lambda r: r if r[1].get("state") == "RUNNING" else None)(
        node.instance(0)), 30, "RUNNING")
    old = body["pid"]
    agent = psutil.Process(node.proc.pid)  # type: ignore[union-attr]

    def new_pid() -> bool:
        for child in agent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid != old and "main.py" in child.cmdline():
                    return True
        return False

    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    wait_until(new_pid, 5, "a new pid", interval=0.001)
    elapsed = time.monotonic() - killed
    wait_until(lambda: node.instance(0)[0] == 200, 60, "ready again", interval=0.05)
    return elapsed


IDLE_GPUS = 8
IDLE_SECONDS = 10.0


def idle_cost(scratch: Path, url: str, commit: str) -> dict[str, float]:
    """A ready node of IDLE_GPUS instances at the default probe interval: the agent's RSS and
    its CPU (and supervisord's) over IDLE_SECONDS with no client (issue 14: <= 80 MB, < 0.5 %)."""
    node = Node(scratch / "ws-idle", {"COMFYUI_REPO": url, "COMFYUI_REF": commit}, gpus=IDLE_GPUS)
    node.env.pop("PROBE_INTERVAL")  # the harness's fast probing: here the default
    try:
        node.start()
        node.wait_ready(120)
        agent = psutil.Process(node.proc.pid)  # type: ignore[union-attr]
        supervisord = agent.children()[0]
        time.sleep(2.0)  # the boot's own work (imports, smoke prompts) settled
        procs = {"agent": agent, "supervisord": supervisord}
        before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
        time.sleep(IDLE_SECONDS)
        cpu = {name: (sum(p.cpu_times()[:2]) - before[name]) / IDLE_SECONDS * 100
               for name, p in procs.items()}
        return {
            f"agent_rss_mib_{IDLE_GPUS}_instances": round(agent.memory_info().rss / 2**20, 1),
            "agent_idle_cpu_pct": round(cpu["agent"], 2),
            "supervisord_idle_cpu_pct": round(cpu["supervisord"], 2),
        }
    finally:
        node.kill_everything()


async def _load(url: str) -> list[float]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for _ in range(REQUESTS_PER_CLIENT):
                started = time.perf_counter()
                async with session.get(url) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return latencies


def health_latency(kind: str) -> dict[str, float]:
    port = free_port_range(1)
    # The same servers as health_rps.py: a bare aiohttp handler, or the product's over 8 instances.
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, "asyncio", str(port), str(ROOT)])
    try:
        url = f"http://127.0.0.1:{port}/health/comfyui"
        wait_until(lambda: http_json(url, 1)[0] == 200, 30, f"{kind} server", interval=0.01)
        started = time.monotonic()
        latencies = asyncio.run(_load(url))
        wall = time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "requests_per_s": len(latencies) / wall,
    }


def byte_compile_the_agent() -> None:
    """Write the agent's .pyc files, as installing its wheel does (the image: uv with
    UV_COMPILE_BYTECODE): an editable checkout under PYTHONDONTWRITEBYTECODE=1 would compile
    every module at every start, which no installed agent does."""
    import compileall

    for package in ("machine", "config", "services", "health"):
        compileall.compile_dir(ROOT / package, quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    byte_compile_the_agent()
    scratch = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/tmp"))
    results: dict[str, object] = {}
    try:
        url, commit = prepare_standin_repo(scratch)
        env = {"COMFYUI_REPO": url, "COMFYUI_REF": commit, "PROBE_INTERVAL": "2",
               "INSTANCE_STABLE_SECS": str(STABLE_S), "COMFYUI_STANDIN_GC_PAUSE": FIRST_GC_PAUSE_S}
        node = Node(scratch / "ws", env, gpus=1)
        node.start()
        node.wait_ready()  # cold boot: clone, then the instance
        node.stop()
        source = scratch / "ws" / "ComfyUI"
        bare, warm = [], []
        for _ in range(args.runs):
            bare.append(bare_standin_start(source))
            warm.append(warm_up_to_ready(node))
            if _ == 0:
                agent = psutil.Process(node.proc.pid)  # type: ignore[union-attr]
                supervisord = agent.children()[0]
                results["agent_rss_mib"] = round(agent.memory_info().rss / 2**20, 1)
                results["supervisord_rss_mib"] = round(supervisord.memory_info().rss / 2**20, 1)
            node.stop()
        results["bare_standin_start_s"] = round(statistics.median(bare), 3)
        results["warm_up_to_ready_s"] = round(statistics.median(warm), 3)
        results["warm_up_overhead_s"] = round(statistics.median(warm) - statistics.median(bare), 3)
        results["warm_up_ratio"] = round(statistics.median(warm) / statistics.median(bare), 2)
        results.update(idle_cost(scratch, url, commit))
        node.start()
        node.wait_ready()
        crashes = [crash_to_503(node) for _ in range(args.runs)]
        respawns = []
        for _ in range(args.runs):
            time.sleep(STABLE_S)  # each kill a first crash: no crash-loop backoff holds it
            respawns.append(crash_to_new_pid(node))
        node.stop()
        results["crash_to_new_pid_ms_median"] = round(statistics.median(respawns) * 1000, 1)
        results["crash_to_new_pid_ms_max"] = round(max(respawns) * 1000, 1)
        results["crash_to_503_ms_median"] = round(statistics.median(crashes) * 1000, 1)
        results["crash_to_503_ms_max"] = round(max(crashes) * 1000, 1)
        bare_http = health_latency("bare")
        ours = health_latency("health")
        results["health_p50_ms"] = round(ours["p50_ms"], 2)
        results["health_p99_ms"] = round(ours["p99_ms"], 2)
        results["bare_p50_ms"] = round(bare_http["p50_ms"], 2)
        results["bare_p99_ms"] = round(bare_http["p99_ms"], 2)
        results["health_p99_ratio"] = round(ours["p99_ms"] / bare_http["p99_ms"], 2)
        results["health_rps"] = round(ours["requests_per_s"])
        results["bare_rps"] = round(bare_http["requests_per_s"])
    finally:
        if "node" in locals():
            node.kill_everything()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(k) for k in results)
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
