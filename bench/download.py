"""Model download benchmark, all local, in one run:

1. a 1 GiB file from a local aiohttp server (FileResponse, sendfile): ``curl -o`` against
   comfy-machine's fetcher (sha256 computed in-stream, fsync, rename), alternating runs;
   figure: throughput ratio ours / curl (goal >= 0.9);
2. warm verification of 20 recorded files (goal <= 1 s), with the cold hash for contrast.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.models import ModelEntry, build_model_specs  # noqa: E402
from services.models.fetcher import ModelFetcher  # noqa: E402
from services.state import MachineState  # noqa: E402
from tests.integration.test_models_server import FileServer  # noqa: E402

MIB = 1 << 20


def make_file(path: Path, size: int) -> str:
    """Pseudo-random content (a 16 MiB random block varied per piece); its sha256."""
    block = os.urandom(16 * MIB)
    hasher = hashlib.sha256()
    with path.open("wb") as fh:
        for i in range(0, size, len(block)):
            piece = (i.to_bytes(8, "little") + block[8:])[: size - i]
            hasher.update(piece)
            fh.write(piece)
    return hasher.hexdigest()


def run_curl(url: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(out), url], check=True)
    took = time.perf_counter() - start
    out.unlink()
    return took


def run_ours(url: str, store: Path, digest: str, size: int) -> float:
    specs, problems = build_model_specs(
        [ModelEntry(url=url, folder="checkpoints", sha256=digest, size=size)]
    )
    assert not problems
    start = time.perf_counter()
    failed = asyncio.run(ModelFetcher(specs, store, MachineState(), environ={}).run())
    took = time.perf_counter() - start
    assert not failed, failed[0].error
    shutil.rmtree(store)
    return took


def verification(root: Path, count: int, size: int) -> tuple[float, float]:
    """(cold: hash and record 20 files already on disk, warm: check them against the record)."""
    store = root / "store"
    sources = root / "sources"
    sources.mkdir()
    entries = []
    for i in range(count):
        path = sources / f"m{i}.safetensors"
        digest = make_file(path, size)
        (store / "loras").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, store / "loras" / path.name)  # already in place, never recorded
        entries.append(ModelEntry(url=path.as_uri(), folder="loras", sha256=digest, size=size))
    specs, _ = build_model_specs(entries)

    def timed() -> float:
        state = MachineState()
        start = time.perf_counter()
        failed = asyncio.run(ModelFetcher(specs, store, state, environ={}).run())
        took = time.perf_counter() - start
        assert not failed and state.download_bytes_total == 0
        return took

    return timed(), min(timed() for _ in range(3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--verify-files", type=int, default=20)
    parser.add_argument("--verify-mib", type=int, default=32, help="size of each verified file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        server = FileServer(Path(args.serve)).start()
        print(server.port, flush=True)
        sys.stdin.read()  # until the benchmark closes the pipe or terminates us
        return 0
    if not shutil.which("curl"):
        print("curl is needed for the baseline", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="cm-bench-dl-"))
    try:
        served = root / "served"
        served.mkdir()
        size = args.size_mib * MIB
        digest = make_file(served / "big.safetensors", size)
        # The server runs in its own process, so that neither client shares its interpreter.
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(served)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/files/big.safetensors"
        try:
            curl, ours = [], []
            for _ in range(args.runs):  # alternate, so both see the same cache and load
                curl.append(run_curl(url, root / "curl.out"))
                ours.append(run_ours(url, root / "store", digest, size))
        finally:
            server.terminate()
            server.wait(10)
        cold, warm = verification(root, args.verify_files, args.verify_mib * MIB)
        result = {
            "size_bytes": size,
            "curl_s": [round(t, 3) for t in curl],
            "ours_s": [round(t, 3) for t in ours],
            "curl_mib_s": round(args.size_mib / statistics.median(curl), 1),
            "ours_mib_s": round(args.size_mib / statistics.median(ours), 1),
            "ratio_ours_over_curl": round(statistics.median(curl) / statistics.median(ours), 3),
            "verify_files": args.verify_files,
            "verify_file_bytes": args.verify_mib * MIB,
            "cold_verify_s": round(cold, 3),
            "warm_verify_s": round(warm, 4),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"1 download of {args.size_mib} MiB from a local server, median of {args.runs}:")
    print(f"  curl -o:                 {result['curl_mib_s']:8.1f} MiB/s  {result['curl_s']}")
    print("  comfy-machine (sha256 in-stream, fsync, rename):")
    print(f"                           {result['ours_mib_s']:8.1f} MiB/s  {result['ours_s']}")
    print(f"  ratio ours/curl:         {result['ratio_ours_over_curl']:.3f}  (goal >= 0.9)")
    print(f"{args.verify_files} files x {args.verify_mib} MiB verification:")
    print(f"  cold (hash + record):    {result['cold_verify_s']:.3f} s")
    print(f"  warm (record, no hash):  {result['warm_verify_s']:.4f} s  (goal <= 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
