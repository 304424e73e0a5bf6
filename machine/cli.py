"""The comfy-machine command line: up, demo, plan, status, wait-ready."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings, load_settings
from machine.errors import ConfigError, MachineError
from machine.logs import setup_logging
from services.gpus import GpuInventory, NvmlInventory
from services.plan import NodePlan
from services.supervisor.conf import render_conf


def _inventory() -> GpuInventory:
    return NvmlInventory()


def _plan(settings: Settings) -> NodePlan:
    from machine.boot import build_plan

    return build_plan(settings, _inventory())


def _serve(settings: Settings, plan: NodePlan, on_ready: Callable[[], None] | None = None) -> int:
    from machine.boot import run_node

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Handlers only set the flag; the shutdown itself runs in run_node under deadlines.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_node(settings, plan, stop, on_ready)

    return asyncio.run(main())


def cmd_up(args: argparse.Namespace) -> int:
    settings = load_settings()
    plan = _plan(settings)
    return _serve(settings, plan)


def cmd_demo(args: argparse.Namespace) -> int:
    from machine.demo import prepare_standin_repo

    workspace = Path(args.workspace).resolve()
    url, commit = prepare_standin_repo(workspace)
    # A demo is for this machine only unless the user says otherwise.
    listen = {} if "MACHINE_HEALTH_LISTEN" in os.environ else {"machine_health_listen": "127.0.0.1"}
    settings = load_settings(
        comfyui_cpu_only=True,
        num_gpus=args.gpus,
        comfyui_repo=url,
        comfyui_ref=commit,
        machine_workspace=workspace,
        **listen,
    )
    plan = _plan(settings)
    host = "127.0.0.1" if plan.health_listen in ("0.0.0.0", "::") else plan.health_listen
    health = f"http://{host}:{plan.health_port}"

    def announce() -> None:
        print(
            f"comfy-machine demo is ready: {len(plan.instances)} ComfyUI stand-in instance(s)",
            flush=True,
        )
        print(f"  health:    {health}/health/comfyui", flush=True)
        for inst in plan.instances:
            print(
                f"  gpu {inst.gpu}:     {inst.url}   ({inst.name}, log {inst.log_path})", flush=True
            )
        print("Stop with Ctrl-C.", flush=True)

    print(f"Booting the demo node in {workspace} (health on {health}) ...", flush=True)
    return _serve(settings, plan, announce)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    settings = load_settings()
    plan = _plan(settings)
    conf = render_conf(plan)
    if args.json:
        print(json.dumps({"plan": _jsonable(plan), "supervisord_conf": conf}, indent=2))
        return 0
    print(f"workspace: {plan.workspace}")
    print(f"ComfyUI:   {settings.comfyui_repo} @ {settings.comfyui_ref} -> {plan.install_path}")
    print(f"health:    http://{plan.health_listen}:{plan.health_port}/health/comfyui")
    print(f"instances: {len(plan.instances)}{' (CPU mode)' if plan.cpu_only else ''}")
    for inst in plan.instances:
        print(
            f"- {inst.name}: gpu {inst.gpu} ({inst.gpu_name}, {inst.gpu_uuid}) port {inst.port}"
            f" url {inst.url}"
        )
        print(f"    env:  {' '.join(f'{k}={v}' for k, v in inst.env.items())}")
        print(f"    argv: {' '.join(inst.argv)}")
        print(f"    cwd:  {inst.cwd}   log: {inst.log_path}")
    print(f"\n# {plan.supervisor_conf} (not written)")
    print(conf)
    return 0


def _health_base(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    settings = load_settings()
    host = settings.machine_health_listen
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{settings.machine_health_port}"


def cmd_status(args: argparse.Namespace) -> int:
    from machine.health_client import get_health

    code, body = asyncio.run(get_health(_health_base(args), "/health/comfyui"))
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(f"node: {body.get('status')} (phase {body.get('phase')}, HTTP {code})")
        for inst in body.get("instances", []):
            queue = f"queue {inst.get('queue_running')}/{inst.get('queue_pending')}"
            print(
                f"gpu {inst['gpu']}  {inst['name']:<14} {inst['state']:<9} "
                f"{'ready' if inst['ready'] else 'not ready':<9} port {inst['port']}  "
                f"pid {inst['pid']}  restarts {inst['restarts']}  {queue}"
            )
            for reason in inst.get("reasons", []):
                print(f"      {reason}")
    return 0 if code == 200 else 1


def cmd_wait_ready(args: argparse.Namespace) -> int:
    from machine.health_client import wait_ready

    path = "/health/comfyui" if args.gpu is None else f"/health/comfyui/instances/{args.gpu}"
    ready, body = asyncio.run(wait_ready(_health_base(args), path, args.timeout))
    if ready:
        what = "node" if args.gpu is None else f"gpu {args.gpu}"
        url = body.get("url")
        print(f"{what} ready" + (f": {url}" if url else ""))
        return 0
    print(f"not ready after {args.timeout:g}s:", file=sys.stderr)
    for reason in body.get("reasons") or [body.get("error", "no reason given")]:
        print(f"  {reason}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-machine",
        description="Supervise one ComfyUI instance per GPU, with health that gates workers.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="boot and supervise the node until SIGTERM (the entrypoint)")
    demo = sub.add_parser("demo", help="the same boot without a GPU, on the ComfyUI stand-in")
    demo.add_argument("--gpus", type=int, default=2, help="CPU instances to run (default 2)")
    demo.add_argument(
        "--workspace",
        default="demo-workspace",
        help="workspace directory (default ./demo-workspace)",
    )
    plan = sub.add_parser("plan", help="validate settings, print the plan; start nothing")
    plan.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="ask a running node's health server")
    status.add_argument("--json", action="store_true")
    status.add_argument("--url", help="health server base URL (default from settings)")
    wait = sub.add_parser("wait-ready", help="block until the node or one GPU is ready")
    wait.add_argument("--gpu", type=int, help="wait for this GPU's instance only")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    wait.add_argument("--url", help="health server base URL (default from settings)")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up,
    "demo": cmd_demo,
    "plan": cmd_plan,
    "status": cmd_status,
    "wait-ready": cmd_wait_ready,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print("comfy-machine: invalid settings, nothing was started:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return exc.exit_code
    except MachineError as exc:
        print(f"comfy-machine: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
