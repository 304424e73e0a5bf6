"""Scrape cost of /metrics for a node with 8 instances and 8 (fake) GPUs, against baselines
measured in the same run: an empty registry's exposition (the fixed cost of the call) and the
/health/comfyui JSON of the same state (what every health request already pays). The route
builds the families on the event loop and encodes them in a thread: both parts are shown.

    python bench/metrics_scrape.py [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from health import checks  # noqa: E402
from health.metrics import MachineCollector, build_registry  # noqa: E402
from health.server import create_app  # noqa: E402
from services.state import CustomNodeState, GpuStatus, MachineState, StepStatus  # noqa: E402
from tests.support import free_port_range  # noqa: E402
from tests.unit.test_checks import instance, make_ready, node  # noqa: E402

GPUS = 8


def busy_state() -> MachineState:
    """8 ready instances with queues, 8 sampled GPUs with Xids, 3 install steps, 10 nodes."""
    state = node(*(make_ready(instance(i), pid=1000 + i) for i in range(GPUS)))
    for i, inst in state.instances.items():
        inst.queue_pending, inst.queue_running, inst.restarts = i, 1, i % 3
        state.gpus[i] = GpuStatus(
            index=i,
            uuid=f"GPU-{i}",
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"00000000:{i + 1:02x}:00.0",
            sampled_at=time.time(),
            temperature_celsius=55.0 + i,
            power_watts=310.0,
            utilization_ratio=0.9,
            memory_utilization_ratio=0.4,
            memory_used_bytes=40 * 2**30,
            memory_free_bytes=40 * 2**30,
            memory_total_bytes=80 * 2**30,
            ecc_corrected_total=0,
            ecc_uncorrected_total=0,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=0,
            row_remap_pending=False,
            row_remap_failed=False,
            retired_pages_pending=False,
            xid_counts={13: 2} if i == 3 else {},
        )
    for name in ("checkout ComfyUI", "python environment", "requirements"):
        step = state.step(name)
        step.status, step.duration_s = StepStatus.DONE, 0.5
    for n in range(10):
        state.custom_nodes[f"node{n}"] = CustomNodeState(
            f"node{n}", f"file:///nodes/{n}", "main", required=False, enabled=True
        )
    return state


def timed(fn: Callable[[], object], iterations: int) -> dict[str, float]:
    """Median and p99 in microseconds of ``fn`` over ``iterations`` calls (after a warm-up)."""
    for _ in range(min(50, iterations)):
        fn()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "median_us": round(statistics.median(samples) * 1e6, 1),
        "p99_us": round(samples[int(0.99 * (len(samples) - 1))] * 1e6, 1),
    }


async def http_latency(state: MachineState, iterations: int) -> dict[str, dict[str, float]]:
    """Sequential GETs of /metrics and /health/comfyui over real HTTP (one keep-alive client)."""
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    port = free_port_range(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    results: dict[str, dict[str, float]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/health/comfyui", "/metrics"):
                url = f"http://127.0.0.1:{port}{path}"
                samples = []
                for i in range(iterations + 50):
                    started = time.perf_counter()
                    async with session.get(url) as resp:
                        await resp.read()
                    if i >= 50:  # warm-up
                        samples.append(time.perf_counter() - started)
                samples.sort()
                results[path] = {
                    "median_us": round(statistics.median(samples) * 1e6, 1),
                    "p99_us": round(samples[int(0.99 * (len(samples) - 1))] * 1e6, 1),
                }
    finally:
        await runner.cleanup()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    state = busy_state()
    collector = MachineCollector(state)
    ours = CollectorRegistry(auto_describe=False)
    ours.register(collector)
    full = build_registry(state)
    empty = CollectorRegistry(auto_describe=False)
    body = generate_latest(full)
    results: dict[str, object] = {
        "instances": len(state.instances),
        "gpus": len(state.gpus),
        "series_comfy_machine": sum(len(f.samples) for f in collector.collect()),
        "metrics_body_bytes": len(body),
        "health_json_bytes": len(json.dumps(checks.node_report(state, time.time())[1])),
        # What /metrics does on the event loop (blocking health requests): build the families.
        "collect_on_loop": timed(lambda: list(collector.collect()), args.iterations),
        # Then, in a thread: encode them (ours alone, and with the agent's process metrics).
        "exposition_comfy_machine": timed(lambda: generate_latest(ours), args.iterations),
        "exposition_full_metrics": timed(lambda: generate_latest(full), args.iterations),
        "baseline_empty_registry": timed(lambda: generate_latest(empty), args.iterations),
        "baseline_health_json": timed(
            lambda: json.dumps(checks.node_report(state, time.time())[1]), args.iterations
        ),
    }
    http = asyncio.run(http_latency(state, max(200, args.iterations // 4)))
    results["http_get_metrics"] = http["/metrics"]
    results["http_get_health_comfyui"] = http["/health/comfyui"]
    expo = results["exposition_comfy_machine"]["median_us"]  # type: ignore[index]
    health = results["baseline_health_json"]["median_us"]  # type: ignore[index]
    loop = results["collect_on_loop"]["median_us"]  # type: ignore[index]
    results["ratio_on_loop_to_health_json"] = round(loop / health, 2)
    results["ratio_exposition_to_health_json"] = round(expo / health, 2)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        width = max(len(k) for k in results)
        for key, value in results.items():
            if isinstance(value, dict):
                value = "  ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
