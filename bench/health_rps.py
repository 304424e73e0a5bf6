"""Health throughput and latency under 200 connections, against a bare aiohttp handler in the
same run (issue 14).

Each round starts, one after another: a bare aiohttp handler on the default asyncio loop (the
baseline), then the product's health server (as `up` starts it: guarded protocol, limits) over
a node of 8 ready instances on the default asyncio loop and on uvloop (when installed), and
loads `/readyz` and `/health/comfyui` of each with `wrk -t1 -c200` (or, without wrk, an aiohttp
client, which is slower than the servers it measures: its figures are the client's). Rounds
alternate; the figures are medians over the rounds and ratios to the bare handler's medians.

    python bench/health_rps.py [--rounds 3] [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import free_port_range, http_json, wait_until  # noqa: E402

CONNECTIONS = 200

SERVER = r'''
import asyncio, sys
kind, loop_kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from aiohttp import web
from health.server import HEALTH_BACKLOG, start_health_server


async def main():
    if kind == "bare":
        app = web.Application()

        async def handler(request):
            return web.json_response({"status": "ready", "phase": "READY", "reasons": []})

        app.router.add_get("/readyz", handler)
        app.router.add_get("/health/comfyui", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=HEALTH_BACKLOG).start()
    else:  # the product's own server, as `up` starts it, over a node of 8 ready instances
        from tests.unit.test_checks import instance, make_ready, node
        state = node(*(make_ready(instance(i), pid=1000 + i) for i in range(8)))
        await start_health_server(state, "127.0.0.1", port)
    await asyncio.Event().wait()

if loop_kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
'''

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(url: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    if len(pct) != 2:
        raise RuntimeError(f"wrk's output not understood:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} non-2xx answers")
    return {"rps": rps, "p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"])}


async def _aiohttp_load(url: str, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.get(url) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
        wall = time.monotonic() - started
    latencies.sort()
    pick = lambda pct: latencies[round(pct / 100 * (len(latencies) - 1))] * 1000  # noqa: E731
    return {"rps": len(latencies) / wall, "p50_ms": pick(50), "p99_ms": pick(99)}


def load(url: str, seconds: float) -> dict[str, float]:
    if shutil.which("wrk"):
        return run_wrk(url, seconds)
    return asyncio.run(_aiohttp_load(url, seconds))


def measure(kind: str, loop: str, paths: list[str], seconds: float) -> dict[str, dict[str, float]]:
    port = free_port_range(1)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, loop, str(port), str(ROOT)])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_json(base + "/readyz", 1)[0] == 200, 30, f"{kind} server",
                   interval=0.01)
        load(base + paths[0], 1)  # warm: connections, caches
        return {path: load(base + path, seconds) for path in paths}
    finally:
        proc.terminate()
        proc.wait(10)


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--peer", metavar="URL", action="append", default=[],
                        help="also load this already running server each round (a peer such as "
                        "comfyui-api's /ready), side by side; may be given more than once")
    args = parser.parse_args()
    paths = ["/readyz", "/health/comfyui"]
    servers = [("bare", "asyncio"), ("health", "asyncio")]
    if have_uvloop():
        servers.append(("health", "uvloop"))
    samples: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        # Alternate the order so drift on a shared machine does not favour one server.
        order = servers if round_ % 2 == 0 else servers[::-1]
        for kind, loop in order:
            measured = measure(kind, loop, paths if kind == "health" else paths[:1], args.seconds)
            for path, figures in measured.items():
                samples.setdefault(f"{kind} {loop} {path}", []).append(figures)
        for url in args.peer:  # not ours to start: loaded as it runs, after a warm-up
            load(url, 1)
            samples.setdefault(f"peer {url}", []).append(load(url, args.seconds))
    results: dict[str, object] = {"client": "wrk -t1 -c200" if shutil.which("wrk") else
                                  "aiohttp (slower than the servers)", "rounds": args.rounds}
    med = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
           for name, runs in samples.items()}
    bare = med["bare asyncio /readyz"]
    for name, figures in med.items():
        results[name] = {
            "rps": round(figures["rps"]),
            "p50_ms": round(figures["p50_ms"], 2),
            "p99_ms": round(figures["p99_ms"], 2),
            "rps_ratio": round(figures["rps"] / bare["rps"], 2),
            "p99_ratio": round(figures["p99_ms"] / bare["p99_ms"], 2),
        }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"client: {results.pop('client')}, medians of {results.pop('rounds')} rounds")
        print(f"{'server':<32} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rps/bare':>9} "
              f"{'p99/bare':>9}")
        for name, f in results.items():
            assert isinstance(f, dict)
            print(f"{name:<32} {f['rps']:>8} {f['p50_ms']:>8} {f['p99_ms']:>8} "
                  f"{f['rps_ratio']:>9} {f['p99_ratio']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
