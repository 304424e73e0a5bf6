"""A warm boot over a bare start of the same ComfyUI, with the ComfyUI you installed.

Run it in the environment `comfy-machine up` boots with, once that environment has been booted
(installed) at least once; it installs nothing and needs exactly one instance (NUM_GPUS=1):

    COMFYUI_CPU_ONLY=true NUM_GPUS=1 MACHINE_WORKSPACE=... \
        python bench/warm_boot_real.py --rounds 12

Each round, in alternating order: ``bare`` spawns instance 0 as the plan does (its argv, env and
cwd from `comfy-machine plan --json`) and times it to its first 200 from /system_stats; ``up``
runs `comfy-machine up` and times it to /health/comfyui ready. Their difference is the overhead
(issue 14: <= 0.5 s). Each `up` is also split into parts: when supervisord spawned the instance
(its log), when the agent saw its first answer (its "instance answering"), and ready.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import http_json, wait_until  # noqa: E402

POLL_S = 0.01


def agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "machine", *args]


def bare_start(inst: dict[str, Any], limit: float) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(inst["argv"], cwd=inst["cwd"], env={**os.environ, **inst["env"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: http_json(inst["url"] + "/system_stats", 2)[0] == 200, limit,
                   "the bare instance answering", interval=POLL_S)
        return time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def spawned_at(supervisord_log: Path, name: str) -> float | None:
    """When supervisord last spawned ``name`` (its log's local time, to the millisecond)."""
    try:
        lines = [line for line in supervisord_log.read_text().splitlines()
                 if f"spawned: '{name}'" in line]
    except OSError:
        return None
    return datetime.strptime(lines[-1][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() if lines else None


def warm_up(plan: dict[str, Any], log_path: Path, limit: float) -> dict[str, Any]:
    host = plan["health_listen"] if plan["health_listen"] not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{plan['health_port']}/health/comfyui"
    wall, started = time.time(), time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(agent("up"), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_json(url, 2)[1].get("status") == "ready", limit, "up ready",
                   interval=POLL_S)
        took = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    events: dict[str, float] = {}
    head_start = False
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            events.setdefault(record.get("event", ""), record.get("ts", 0.0) - wall)
            head_start = head_start or bool(record.get("ahead_of_settings"))
    name = plan["instances"][0]["name"]
    spawn = spawned_at(Path(plan["log_dir"]) / "supervisord.log", name)
    return {"up": took, "head_start": head_start,
            "spawn": None if spawn is None else spawn - wall,
            "answering": events.get("instance answering")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds a start may take")
    args = parser.parse_args()
    # Stopped with SIGINT (ComfyUI's clean stop): started as a background job, this process has
    # it ignored, and so would its children; a handler here is reset to the default at exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    planned = subprocess.run(agent("plan", "--json"), capture_output=True, text=True)
    if planned.returncode != 0:
        print(f"`comfy-machine plan` failed in this environment:\n{planned.stderr}",
              file=sys.stderr)
        return 2
    plan = json.loads(planned.stdout)["plan"]
    if len(plan["instances"]) != 1:
        print(f"needs exactly one instance (the plan has {len(plan['instances'])}): "
              "set NUM_GPUS=1", file=sys.stderr)
        return 2
    inst = plan["instances"][0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cm-warm-") as scratch:
        for index in range(args.rounds):
            row: dict[str, Any] = {}
            for arm in ("bare", "up") if index % 2 == 0 else ("up", "bare"):
                if arm == "bare":
                    row["bare"] = bare_start(inst, args.limit)
                else:
                    row.update(warm_up(plan, Path(scratch) / f"up-{index}.log", args.limit))
            row["overhead"] = row["up"] - row["bare"]
            if row["spawn"] is not None and row["answering"] is not None:
                row["start_in_up"] = row["answering"] - row["spawn"]
                row["answer_to_ready"] = row["up"] - row["answering"]
            rows.append(row)
            parts = (f"; spawned +{row['spawn']:.3f} s, its start {row['start_in_up']:.2f} s, "
                     f"answer -> ready {row['answer_to_ready'] * 1000:.0f} ms"
                     if "start_in_up" in row else "")
            print(f"round {index}: bare {row['bare']:.2f} s, up {row['up']:.2f} s, overhead "
                  f"{row['overhead']:+.2f} s, head start {row['head_start']}{parts}", flush=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows if r.get(key) is not None)

    split = [r for r in rows if "start_in_up" in r]
    print(f"median of {len(rows)}: bare {median('bare'):.2f} s, up {median('up'):.2f} s, "
          f"overhead {median('overhead'):+.3f} s")
    if split:
        print(f"parts (median of {len(split)}): spawned +{median('spawn'):.3f} s, start longer "
              f"than bare by {statistics.median(r['start_in_up'] - r['bare'] for r in split):+.3f}"
              f" s, answer -> ready {median('answer_to_ready') * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
