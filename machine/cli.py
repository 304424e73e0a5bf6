"""The comfy-machine command line: up, demo, plan, status, logs, wait-ready."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.errors import ConfigError, MachineError
from config.health_address import env_health_address, health_base_url

# Each command imports what it uses, in its own function: `status`, `wait-ready` and `plan`
# start fast as whole processes (issue 14): none of them pays for the
# pydantic-settings, aiohttp, boot services, gitpython or prometheus it does not use. The
# commands that ask a running node (status, wait-ready, logs, the operator actions) use the
# standard library's HTTP client and find the node without Settings in the common case.
if TYPE_CHECKING:
    from config.settings import Settings
    from services.plan import NodePlan
    from services.supervisor.head_start import HeadStart
    from services.workspace_lock import WorkspaceLock

# A head start the boot did not keep (its settings failed, say): supervisord stops its programs
# within their stop timeouts; then its session is killed.
HEAD_START_STOP_GRACE_S = 30.0


def load_settings(**overrides: Any) -> Settings:
    """config.settings.load_settings, imported on first use (pydantic-settings is slow to load)."""
    from config.settings import load_settings as load

    return load(**overrides)


def setup_logging(level: str) -> None:
    """machine.logs.setup_logging, imported on first use (see ASKING_COMMANDS)."""
    from machine.logs import setup_logging as setup

    setup(level.upper())


# Commands that only ask a running node over HTTP. They log nothing themselves, so logging
# (~10 ms of their start: issue 14) is set up only when they read Settings, which can log.
ASKING_COMMANDS = frozenset({"status", "logs", "wait-ready", "restart", "drain", "undrain"})


def _asking_settings(args: argparse.Namespace) -> Settings:
    """Settings for a command that asks a running node, with logging set up first."""
    setup_logging(args.log_level)
    return load_settings()


def _plan(settings: Settings) -> NodePlan:
    from machine.planning import build_plan, nvml_for

    return build_plan(settings, nvml_for(settings))


def _serve(
    settings: Settings,
    plan: NodePlan,
    on_ready: Callable[[], None] | None = None,
    head: HeadStart | None = None,
    early_stops: list[int] | None = None,
) -> int:
    import asyncio
    import importlib
    import signal

    from machine.warm_start import new_state, warm_launch

    async def main() -> int:
        stop, stop_now = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        # Handlers only set a flag; the shutdown itself runs in run_node under deadlines. The
        # first SIGTERM/SIGINT drains (running prompts finish), a second one stops at once.
        def on_signal() -> None:
            (stop_now if stop.is_set() else stop).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        for _ in early_stops or ():  # received while the settings loaded
            on_signal()
        state = new_state(settings, plan)
        launched = warm_launch(settings, plan, state, head)
        # The rest of the agent (health server, installer, HTTP clients: ~0.5 s of imports) loads
        # in a thread while a warm launch starts supervisord and the instances on this loop.
        boot = await asyncio.to_thread(importlib.import_module, "machine.boot")
        code: int = await boot.run_node(settings, plan, stop, on_ready, stop_now, state, launched)
        # Stopped: a thread still blocked (say in a download) must not keep the agent alive.
        boot.exit_if_stuck(code)
        return code

    from machine.event_loop import run

    return run(main(), settings.machine_event_loop)


def _own(workspace: Path, command: str, source: str = "MACHINE_WORKSPACE") -> WorkspaceLock:
    """Before a command writes the workspace: check it can be written and take its owner lock
    (held until this process exits; a second owner fails at once with exit code 2)."""
    from config.settings import check_workspace
    from services.workspace_lock import acquire as acquire_workspace

    problems = check_workspace(workspace, source)
    if problems:
        raise ConfigError(problems)
    return acquire_workspace(workspace, f"comfy-machine {command}", source)


def _head_start() -> HeadStart | None:
    """On a warm boot whose inputs are those of the last one: supervisord started from its
    record before Settings is even imported (services/supervisor/head_start.py)."""
    from services.supervisor.head_start import guess_workspace, record_path, try_head_start
    from services.workspace_lock import acquire as acquire_workspace

    workspace = guess_workspace(os.environ)
    if not record_path(workspace).is_file():
        return None
    try:
        # Held from here to the end of `up` (_own takes the same lock again).
        acquire_workspace(workspace, "comfy-machine up")
        return try_head_start(os.environ, workspace)
    except Exception as exc:  # the boot goes on as without a record, and reports what is wrong
        import logging

        logger = logging.getLogger(__name__)
        if isinstance(exc, MachineError | OSError):  # a busy workspace, say: the boot says so
            logger.info("no head start", extra={"fields": {"reason": str(exc)}})
        else:  # a bug here must not stop the boot
            logger.exception("no head start: it failed")
        return None


def _defer_stop_signals() -> tuple[list[int], Callable[[], None]]:
    """SIGTERM and SIGINT from now on are noted for _serve to act on (a head start's supervisord
    runs before the agent's own handlers are set, and a stop must stop it in order, as any
    other); and the function that gives them back their previous handlers."""
    import signal

    noted: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: noted.append(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return noted, restore


def cmd_up(args: argparse.Namespace) -> int:
    early_stops, restore_signals = _defer_stop_signals()  # before supervisord may start
    head = _head_start()
    if head is None:  # nothing started: a stop while the settings load acts as usual
        restore_signals()
    try:
        settings = load_settings()
        plan = _plan(settings)
        with _own(settings.machine_workspace, "up"):
            return _serve(settings, plan, head=head, early_stops=early_stops)
    finally:
        if head is not None and not head.adopted:
            head.stop(HEAD_START_STOP_GRACE_S)


def cmd_demo(args: argparse.Namespace) -> int:
    workspace = Path(args.workspace).resolve()
    with _own(workspace, "demo", "--workspace"):
        return _demo(args, workspace)


def _demo(args: argparse.Namespace, workspace: Path) -> int:
    from machine.demo import prepare_standin_repo

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
    health = health_base_url(plan.health_listen, plan.health_port)

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
            if inst.public_url:
                print(f"      public: {inst.public_url}   (the proxy: the access token needed)",
                      flush=True)
        print("Stop with Ctrl-C.", flush=True)

    print(f"Booting the demo node in {workspace} (health on {health}) ...", flush=True)
    return _serve(settings, plan, announce)


def _jsonable(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def cmd_install(args: argparse.Namespace) -> int:
    from machine.install_cmd import run_install

    settings = load_settings()
    plan = _plan(settings)
    with _own(settings.machine_workspace, "install"):
        return run_install(settings, plan, check_imports=not args.no_import_check)


def cmd_gpu_test(args: argparse.Namespace) -> int:
    from machine.gpu_test_cmd import run_gpu_test

    if args.lift:
        if args.gpu is None:
            print("comfy-machine: gpu-test --lift needs --gpu N", file=sys.stderr)
            return 2
        return _act(args, f"/health/comfyui/gpus/{args.gpu}/retest")
    settings = load_settings()
    return run_gpu_test(settings, _plan(settings), args.gpu, args.json)


def cmd_models(args: argparse.Namespace) -> int:
    from machine.models_cmd import run_models

    settings = load_settings()
    with _own(settings.machine_workspace, "models"):
        return run_models(settings)


def cmd_plan(args: argparse.Namespace) -> int:
    from machine.plan_cache import cached_plan, keep_plan

    kept = cached_plan(os.environ, args.json)
    if kept is not None:  # made from these very inputs (machine/plan_cache.py)
        sys.stdout.write(kept)
        return 0
    from config.settings import input_env_names, input_files

    settings = load_settings()
    plan = _plan(settings)
    text = _plan_text(settings, plan, args.json)
    sys.stdout.write(text)
    # GPU mode asks NVML and the proxy looks for its binary: inputs the cache does not cover.
    if plan.proxy is None and (settings.comfyui_cpu_only or not settings.enable_comfyui):
        keep_plan(os.environ, args.json, input_env_names(), input_files(settings), text)
    return 0


def _plan_text(settings: Settings, plan: NodePlan, as_json: bool) -> str:
    """What `plan` prints: the plan, the custom nodes and the supervisord.conf."""
    from config.git_input import public_git_url
    from config.settings import custom_node_specs
    from services.supervisor.conf import render_conf

    conf = render_conf(plan)
    specs, comfyui_ref = custom_node_specs(settings)
    if as_json:
        return json.dumps({"plan": _jsonable(plan), "comfyui_ref": comfyui_ref,
                           "custom_nodes": _jsonable(specs), "supervisord_conf": conf},
                          indent=2) + "\n"
    lines = [
        f"workspace: {plan.workspace}",
        f"ComfyUI:   {public_git_url(settings.comfyui_repo)} @ {comfyui_ref} -> "
        f"{plan.install_path}",
    ]
    for spec in specs:
        flags = ", ".join(f for f, on in (("required", spec.required),
                                          ("disabled", not spec.enabled)) if on)
        lines.append(
            f"  node:    {spec.name}: {spec.url} @ {spec.ref}{f' ({flags})' if flags else ''}")
    lines.append(f"health:    http://{plan.health_listen}:{plan.health_port}/health/comfyui")
    lines.append(f"instances: {len(plan.instances)}{' (CPU mode)' if plan.cpu_only else ''}")
    for inst in plan.instances:
        lines.append(
            f"- {inst.name}: gpu {inst.gpu} ({inst.gpu_name}, {inst.gpu_uuid}) port {inst.port}"
            f" url {inst.url}"
        )
        lines.append(f"    env:  {' '.join(f'{k}={v}' for k, v in inst.env.items())}")
        lines.append(f"    argv: {' '.join(inst.argv)}")
        lines.append(f"    cwd:  {inst.cwd}   log: {inst.log_path}")
        if inst.public_url:
            lines.append(
                f"    public: {inst.public_url} (through the proxy, with the access token)")
    if plan.proxy is not None:
        proxy = plan.proxy
        lines.append(f"proxy:     {proxy.name}: Caddy on {proxy.listen}, ports "
                     f"{', '.join(str(p) for p in proxy.ports)} ({proxy.scheme}), access token "
                     "required (COMFYUI_ACCESS_TOKEN)")
        lines.append(f"    config: {proxy.config_path} (written 0600 at boot; holds the token, "
                     "not shown)")
        lines.append(f"    argv:   {' '.join(proxy.argv)}   log: {proxy.log_path}")
    lines.append(f"\n# {plan.supervisor_conf} (not written)")
    lines.append(conf)
    return "\n".join(lines) + "\n"


def _health_base(args: argparse.Namespace) -> str:
    """--url, or the health server's address from the settings: read from the environment
    alone when that tells (no pydantic to load), from Settings when only they can."""
    if getattr(args, "url", None):
        return str(args.url)
    address = env_health_address(os.environ)
    if address is None:  # a MACHINE_CONFIG file, or a value only Settings reads (or refuses)
        settings = _asking_settings(args)
        address = settings.machine_health_listen, settings.machine_health_port
    return health_base_url(*address)


def cmd_status(args: argparse.Namespace) -> int:
    """A table, one line per instance (reasons cut to a terminal's width, whole through a pipe
    so scripts can grep them); the /health/comfyui body as JSON with --json."""
    from machine.health_client import get_health

    base = _health_base(args)
    code, body = get_health(base, "/health/comfyui")
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        gpus = _gpu_facts(base)
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 100_000
        print(status_table(code, body, gpus, width))
    return 0 if code == 200 else 1


# The /metrics families the status table shows, and their place in its (TEMP, MEM) pair.
GPU_FACTS = {
    "comfy_machine_gpu_temperature_celsius": 0,
    "comfy_machine_gpu_framebuffer_used_bytes": 1,
}


def _gpu_facts(base_url: str) -> dict[str, tuple[float | None, float | None]]:
    """GPU UUID -> (temperature in °C, framebuffer used bytes) from the node's /metrics.

    The health JSON does not carry NVML samples; /metrics does. Empty when unreachable."""
    from config.errors import HealthClientError
    from machine.health_client import request

    try:
        _, raw = request("GET", base_url, "/metrics", limit_s=5.0)
        return gpu_facts(raw.decode("utf-8", "replace"))
    except (HealthClientError, ValueError):
        return {}


def gpu_facts(text: str) -> dict[str, tuple[float | None, float | None]]:
    """GPU UUID -> (temperature, framebuffer used) from Prometheus text (/metrics' default).

    Reads only the lines of the GPU_FACTS gauges: prometheus_client's parser would parse every
    family, and importing it alone costs `status` ~25 ms (issue 14)."""
    import re

    # name{label="value",...} value [timestamp]; a label value escapes \\, \" and \n. Greedy
    # braces: a label value may itself hold "} ".
    sample = re.compile(r"(\w+)\{(.*)\}[ \t]+(\S+)(?:[ \t]+\S+)?[ \t]*")
    label = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    names = tuple(GPU_FACTS)
    facts: dict[str, list[float | None]] = {}
    for line in text.splitlines():
        if not line.startswith(names):  # most lines: other families, comments
            continue
        match = sample.fullmatch(line)
        if match is None or match[1] not in GPU_FACTS:
            continue
        labels = {
            key: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)
            for key, value in label.findall(match[2])
        }
        if "UUID" in labels:
            try:
                value = float(match[3])
            except ValueError:
                continue
            facts.setdefault(labels["UUID"], [None, None])[GPU_FACTS[match[1]]] = value
    return {uuid: (temp, used) for uuid, (temp, used) in facts.items()}


# QUEUE is running/pending; TEMP and MEM come from /metrics (NVML), "-" without a sample.
STATUS_COLUMNS = (
    *("GPU", "NAME", "STATE", "READY", "PORT", "PID", "RESTARTS"),
    *("QUEUE", "TEMP", "MEM", "REASON"),
)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def status_table(
    code: int,
    body: dict[str, Any],
    gpus: dict[str, tuple[float | None, float | None]],
    width: int,
) -> str:
    """The node's health as a table: one row per instance, its first reason cut to ``width``."""
    instances = body.get("instances", [])
    ready = sum(1 for i in instances if i.get("ready"))
    lines = [
        f"node: {body.get('status')} (phase {body.get('phase')}, HTTP {code}), "
        f"{ready}/{len(instances)} instances ready"
    ]
    per_instance = {r for i in instances for r in i.get("reasons", [])}
    lines += [f"  {r}" for r in body.get("reasons", []) if r not in per_instance]
    header = list(STATUS_COLUMNS)
    rows = []
    for inst in instances:
        temp, used = gpus.get(inst.get("gpu_uuid") or "", (None, None))
        reasons = inst.get("reasons", [])
        reason = reasons[0] if reasons else ""
        if len(reasons) > 1:
            reason += f" (+{len(reasons) - 1} more)"
        rows.append(
            [
                _cell(inst.get("gpu")),
                _cell(inst.get("name")),
                _cell(inst.get("state")),
                "yes" if inst.get("ready") else "no",
                _cell(inst.get("port")),
                _cell(inst.get("pid")),
                _cell(inst.get("restarts")),
                f"{_cell(inst.get('queue_running'))}/{_cell(inst.get('queue_pending'))}",
                "-" if temp is None else f"{temp:.0f}C",
                "-" if used is None else f"{used / 2**30:.1f}GiB",
                reason,
            ]
        )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    room = max(width - sum(w + 2 for w in widths), 20)
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        reason = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"
        lines.append(("  ".join([*cells, reason])).rstrip())
    return "\n".join(lines)


FOLLOW_POLL_S = 0.5


def cmd_logs(args: argparse.Namespace) -> int:
    """Print an instance's last log lines; with -f keep printing what is appended."""
    try:
        return _logs(args, _health_base(args))
    except KeyboardInterrupt:  # Ctrl-C ends a follow: not an error
        return 0


def cmd_action(args: argparse.Namespace) -> int:
    """restart, drain or undrain the instance on --gpu N of a running node (needs the token)."""
    return _act(args, f"/health/comfyui/instances/{args.gpu}/{args.command}")


def _act(args: argparse.Namespace, path: str) -> int:
    """POST an operator action with MACHINE_HEALTH_TOKEN; 0 when it was done, else 1."""
    from machine.health_client import post_health

    code, body = post_health(_health_base(args), path, headers=_log_auth(args))
    if getattr(args, "json", False):
        print(json.dumps(body, indent=2))
    else:
        print(body.get("message") or body.get("error") or body)
    return 0 if code == 200 and body.get("ok") else 1


def _log_auth(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header for the log route: MACHINE_HEALTH_TOKEN from the environment
    (or the MACHINE_CONFIG file); none when it is not set (the node then answers 401/403)."""
    token = os.environ.get("MACHINE_HEALTH_TOKEN", "").strip()
    # Settings are loaded (slow: pydantic-settings) only when they can hold a token this did
    # not see: a MACHINE_CONFIG file, or the name spelt in another case.
    upper = {key.upper(): value for key, value in os.environ.items()}
    if not token and (upper.get("MACHINE_CONFIG") or upper.get("MACHINE_HEALTH_TOKEN")):
        try:
            secret = _asking_settings(args).machine_health_token
        except ConfigError:
            secret = None
        token = secret.get_secret_value() if secret else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _logs(args: argparse.Namespace, base_url: str) -> int:
    # Follow polls the health server rather than reading the file: it works wherever status
    # does (another container, a port-forward), needs no access to the workspace, and the
    # server keeps the rotation handling (offset + inode) in one place.
    import time

    from machine.health_client import get_health

    path = f"/health/comfyui/instances/{args.gpu}/log"
    headers = _log_auth(args)
    code, body = get_health(base_url, f"{path}?tail={args.tail}", headers=headers)
    while True:
        if code != 200:
            print(f"comfy-machine: {body.get('error', body)}", file=sys.stderr)
            return 1
        for line in body["lines"]:
            print(line)
        sys.stdout.flush()
        if not args.follow:
            if not body["exists"]:
                print(f"(no log yet at {body['log_path']})", file=sys.stderr)
            return 0
        if not body["truncated"]:  # truncated: more is waiting, ask again at once
            time.sleep(FOLLOW_POLL_S)
        query = f"after={body['offset']}"
        if body["inode"] is not None:
            query += f"&inode={body['inode']}"
        code, body = get_health(base_url, f"{path}?{query}", headers=headers)


# wait-ready's exit code when what it waits for cannot become ready without someone acting.
EXIT_NEEDS_ACTION = 3


def progress_line(what: str, body: dict[str, Any], elapsed: float) -> str:
    """One line per change while wait-ready waits: status, state or phase, the first reason."""
    where = f"state {body['state']}" if "state" in body else f"phase {body.get('phase')}"
    reasons = body.get("reasons") or [body.get("error", "")]
    return f"waiting {elapsed:.0f}s: {what} {body.get('status')} ({where}): {reasons[0]}"


def cmd_wait_ready(args: argparse.Namespace) -> int:
    """Exit 0 when ready, 1 on timeout, 3 at once when it cannot become ready without
    someone acting (a FAILED node, a quarantined GPU); a progress line per change on stderr."""
    import time

    from machine.health_client import Outcome, wait_ready

    path = "/health/comfyui" if args.gpu is None else f"/health/comfyui/instances/{args.gpu}"
    what = "node" if args.gpu is None else f"gpu {args.gpu}"
    started = time.monotonic()

    def show(body: dict[str, Any]) -> None:
        print(progress_line(what, body, time.monotonic() - started), file=sys.stderr, flush=True)

    outcome, body = wait_ready(_health_base(args), path, args.timeout, show)
    if outcome is Outcome.READY:
        url = body.get("url")
        print(f"{what} ready" + (f": {url}" if url else ""))
        return 0
    if outcome is Outcome.FINAL:
        print(f"{what} cannot become ready without someone acting:", file=sys.stderr)
        print(f"  {body.get('final_reason')}", file=sys.stderr)
        return EXIT_NEEDS_ACTION
    print(f"not ready after {args.timeout:g}s:", file=sys.stderr)
    for reason in body.get("reasons") or [body.get("error", "no reason given")]:
        print(f"  {reason}", file=sys.stderr)
    return 1


def _timeout(text: str) -> float:
    """A --timeout: a finite number of seconds >= 0 (argparse exits 2 naming it otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds >= 0; give e.g. --timeout 600"
        )
    return value


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
    install = sub.add_parser(
        "install", help="install ComfyUI, custom nodes and their requirements; check imports"
    )
    install.add_argument(
        "--no-import-check",
        action="store_true",
        help="skip loading the nodes with ComfyUI --quick-test-for-ci",
    )
    sub.add_parser(
        "models", help="fetch and verify the model manifest; exit 1 naming what failed"
    )
    plan = sub.add_parser("plan", help="validate settings, print the plan; start nothing")
    plan.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="ask a running node's health server")
    status.add_argument(
        "--json", action="store_true", help="the JSON /health/comfyui body instead"
    )
    status.add_argument("--url", help="health server base URL (default from settings)")
    logs = sub.add_parser("logs", help="print (and with -f follow) an instance's log")
    logs.add_argument(
        "--gpu", type=int, required=True, help="the instance's GPU (NVML index, as nvidia-smi)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, default=100, help="lines to show first (1-1000)")
    logs.add_argument("--url", help="health server base URL (default from settings)")
    gpu_test = sub.add_parser(
        "gpu-test", help="run the sentinel self-test on each instance's GPU (CPU in CPU mode)"
    )
    gpu_test.add_argument("--gpu", type=int, help="only this GPU (NVML index, as nvidia-smi)")
    gpu_test.add_argument("--json", action="store_true")
    gpu_test.add_argument(
        "--lift", action="store_true",
        help="on the running node instead: test --gpu N again and lift its quarantine when it "
        "passes and NVML finds it healthy (needs MACHINE_HEALTH_TOKEN)",
    )
    gpu_test.add_argument("--url", help="health server base URL, with --lift")
    for action, words in (
        ("restart", "restart the instance on --gpu N now (a held start is released)"),
        ("drain", "stop sending new work to --gpu N (accepting: false); its prompts finish"),
        ("undrain", "let --gpu N accept work again"),
    ):
        acting = sub.add_parser(action, help=f"{words}; needs MACHINE_HEALTH_TOKEN")
        acting.add_argument("--gpu", type=int, required=True, help="the instance's GPU")
        acting.add_argument("--json", action="store_true", help="the JSON answer")
        acting.add_argument("--url", help="health server base URL (default from settings)")
    wait = sub.add_parser(
        "wait-ready",
        help="block until the node or one GPU is ready (exit 0); 1 on timeout; 3 at once when "
        "it cannot become ready without someone acting (node FAILED, GPU quarantined)",
    )
    wait.add_argument("--gpu", type=int, help="wait for this GPU's instance only (NVML index)")
    wait.add_argument(
        "--timeout", type=_timeout, default=600.0, help="seconds, a number >= 0 (default 600)"
    )
    wait.add_argument("--url", help="health server base URL (default from settings)")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up,
    "demo": cmd_demo,
    "install": cmd_install,
    "models": cmd_models,
    "plan": cmd_plan,
    "status": cmd_status,
    "logs": cmd_logs,
    "wait-ready": cmd_wait_ready,
    "gpu-test": cmd_gpu_test,
    "restart": cmd_action,
    "drain": cmd_action,
    "undrain": cmd_action,
}


# What a shell reports for a program killed by SIGPIPE (128 + 13), as `yes | head` shows.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ASKING_COMMANDS:
        setup_logging(args.log_level)
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
    except BrokenPipeError:
        # The reader went away (`comfy-machine status | head`): stop quietly, as cat does, and
        # keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
