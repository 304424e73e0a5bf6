"""Installer benchmark: cold install of the stand-in plus 8 local nodes with requirements,
against the seed scripts' way (sequential git clone + pip install -r per node) in the same run;
and the warm-boot install phase with ComfyUI + 10 nodes (goal: <= 2 s).

Everything is local: git repositories made here, tiny wheels served from a directory."""

from __future__ import annotations

import argparse
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

from config.nodes import CustomNodeSpec  # noqa: E402
from machine.demo import prepare_standin_repo  # noqa: E402
from services.install.installer import Installer, InstallInputs  # noqa: E402
from tests.integration.test_installer import make_repo  # noqa: E402
from tests.packages import build_wheel  # noqa: E402


def make_sources(root: Path, count: int) -> tuple[str, dict[str, str], Path]:
    wheels = root / "wheels"
    for name in ("aiohttp", "pyyaml"):  # the stand-in's requirements, as tiny local wheels
        build_wheel(wheels, name, "99.0")
    nodes = {}
    for i in range(count):
        build_wheel(wheels, f"node-dep-{i}", "1.0", ("shared-dep>=1",))
        nodes[f"node{i}"] = make_repo(root / "src" / f"node{i}", {
            "__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
            "requirements.txt": f"node-dep-{i}\nshared-dep\n",
        }, tag="v1")
    build_wheel(wheels, "shared-dep", "1.0")
    comfy_url, _ = prepare_standin_repo(root / "standin")
    return comfy_url, nodes, wheels


def install_inputs(ws: Path, comfy_url: str, nodes: dict[str, str]) -> InstallInputs:
    return InstallInputs(
        comfyui_url=comfy_url, comfyui_ref="HEAD", install_path=ws / "ComfyUI",
        nodes=tuple(CustomNodeSpec(n, u, "v1", False, True, "bench") for n, u in nodes.items()),
        python=ws / "venv" / "bin" / "python", venv=ws / "venv", base_python=sys.executable,
        protected=(), on_conflict="fail", install_py_timeout=60, workers=4, workspace=ws,
        min_free_bytes=0)


def ours(root: Path, comfy_url: str, nodes: dict[str, str]) -> float:
    inputs = install_inputs(root / "ws-ours", comfy_url, nodes)
    started = time.monotonic()
    Installer(inputs, lambda *a: None).run()
    return time.monotonic() - started


def seed_way(root: Path, comfy_url: str, nodes: dict[str, str], wheels: Path) -> float:
    """What the scripts comfy-machine replaces do: clone, then pip install -r, one at a time."""
    ws = root / "ws-seed"
    pip = [str(ws / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index",
           "--find-links", str(wheels), "--disable-pip-version-check"]
    started = time.monotonic()
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, **kw)  # noqa: E731
    run("git", "clone", "-q", comfy_url, str(ws / "ComfyUI"))
    run(sys.executable, "-m", "venv", str(ws / "venv"))
    run(*pip, "-r", str(ws / "ComfyUI" / "requirements.txt"))
    for name, url in nodes.items():
        dest = ws / "ComfyUI" / "custom_nodes" / name
        run("git", "clone", "-q", "--branch", "v1", url, str(dest))
        run(*pip, "-r", str(dest / "requirements.txt"))
    return time.monotonic() - started


def warm(root: Path, comfy_url: str, nodes: dict[str, str], runs: int) -> list[float]:
    inputs = install_inputs(root / "ws-ours", comfy_url, nodes)
    Installer(inputs, lambda *a: None).run()  # bring the workspace to these 10 nodes
    times = []
    for _ in range(runs):
        started = time.monotonic()
        report = Installer(inputs, lambda *a: None).run()
        times.append(time.monotonic() - started)
        assert report.warm
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cm-bench-install-", dir="/tmp"))
    try:
        comfy_url, nodes, wheels = make_sources(root, 10)
        config = root / "uv.toml"
        config.write_text(f'no-index = true\nfind-links = ["{wheels}"]\n')
        os.environ.update(UV_CONFIG_FILE=str(config), UV_OFFLINE="1")
        eight = dict(list(nodes.items())[:8])
        cold_ours, cold_seed = [], []
        for _ in range(args.runs):
            for ws in ("ws-ours", "ws-seed"):
                shutil.rmtree(root / ws, ignore_errors=True)
            cold_seed.append(seed_way(root, comfy_url, eight, wheels))
            cold_ours.append(ours(root, comfy_url, eight))
        warm_times = warm(root, comfy_url, nodes, args.runs)
        results = {
            "cold_8_nodes_seed_s": round(statistics.median(cold_seed), 2),
            "cold_8_nodes_ours_s": round(statistics.median(cold_ours), 2),
            "cold_speedup": round(statistics.median(cold_seed) / statistics.median(cold_ours), 2),
            "warm_10_nodes_install_phase_s": round(statistics.median(warm_times), 3),
            "warm_10_nodes_install_phase_max_s": round(max(warm_times), 3),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
