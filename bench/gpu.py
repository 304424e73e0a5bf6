"""GPU benchmark: the sentinel self-test's time per device (CPU here; each GPU where there is
one), and the cost of one NVML sampling cycle per GPU, with the fake and with the real adapter
where a driver is present.

    python bench/gpu.py [--cycles N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.errors import GpuError  # noqa: E402
from services.gpu.fake import FakeGpu, FakeNvml  # noqa: E402
from services.gpu.interface import Nvml, list_gpus  # noqa: E402
from services.gpu.nvml import RealNvml  # noqa: E402
from services.gpu.sampler import read_all  # noqa: E402
from services.gpu.selftest import run_selftest  # noqa: E402


def sampling_cost(nvml: Nvml, cycles: int) -> dict[str, object]:
    """Median and p95 of one full cycle (every GPU sampled + Xid events drained), per GPU."""
    inventory = nvml.open()
    try:
        indices = [d.index for d in inventory.devices]
        read_all(nvml, indices)  # warm
        times = []
        for _ in range(cycles):
            times.append(read_all(nvml, indices).duration_s)
    finally:
        nvml.close()
    per_gpu = [t / max(1, len(indices)) for t in times]
    return {
        "gpus": len(indices),
        "driver": inventory.driver_version,
        "cycle_ms_p50": round(statistics.median(times) * 1000, 4),
        "per_gpu_ms_p50": round(statistics.median(per_gpu) * 1000, 4),
        "per_gpu_ms_p95": round(sorted(per_gpu)[int(len(per_gpu) * 0.95) - 1] * 1000, 4),
    }


def selftest_times(python: str) -> list[dict[str, object]]:
    rows = []
    devices: list[tuple[str, dict[str, str], str]] = [("cpu", {}, "small"), ("cpu", {}, "full")]
    try:
        gpus = list_gpus(RealNvml())
    except GpuError:
        gpus = []
    devices += [("cuda", {"CUDA_VISIBLE_DEVICES": g.uuid}, "full") for g in gpus]
    for device, env, size in devices:
        wall = time.perf_counter()
        result = asyncio.run(run_selftest(python, env, device, 120, size))
        rows.append(
            {
                "device": device if not env else f"{device} {env['CUDA_VISIBLE_DEVICES']}",
                "name": result.report.get("device_name"),
                "size": size,
                "ok": result.ok,
                "script_s": result.report.get("duration_s"),
                "wall_s": round(time.perf_counter() - wall, 3),
                "error": result.report.get("error"),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--python", default=sys.executable, help="the Python with torch")
    args = parser.parse_args()
    out: dict[str, object] = {"cpus": os.cpu_count()}
    out["sampling_fake_8_gpus"] = sampling_cost(
        FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(8)]), args.cycles
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nvml.json"
        FakeNvml.write(path, [FakeGpu(uuid=f"GPU-{i}") for i in range(8)])
        out["sampling_fake_file_8_gpus"] = sampling_cost(FakeNvml.from_file(path), args.cycles)
    try:
        out["sampling_real"] = sampling_cost(RealNvml(), min(args.cycles, 200))
    except GpuError as exc:
        out["sampling_real"] = f"not measured: {exc}"
    out["selftest"] = selftest_times(args.python)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"CPUs: {out['cpus']}")
    for key in ("sampling_fake_8_gpus", "sampling_fake_file_8_gpus", "sampling_real"):
        print(f"{key}: {out[key]}")
    for row in out["selftest"]:  # type: ignore[union-attr]
        print(f"self-test {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
