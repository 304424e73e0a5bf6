"""`comfy-machine install`: the install phase alone, with progress, then an import check.

The import check runs instance 0's exact command line with ComfyUI's --quick-test-for-ci
(load everything, then exit) and reads the custom-node import results from its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import TextIO

from config.errors import InstallError
from config.settings import Settings
from health.checks import FAILED_NODE_STATES
from machine.warm_start import install_inputs
from services.files import atomic_write_text
from services.import_check import parse_startup_log
from services.install.git_launcher import use_group_git
from services.install.installer import Installer, InstallReport
from services.models.extra_paths import write_extra_model_paths
from services.plan import NodePlan
from services.process_group import run_in_group
from services.state import NodeStatus, StepStatus

MARKS = {
    StepStatus.RUNNING: "…",
    StepStatus.DONE: "✓",
    StepStatus.SKIPPED: "-",
    StepStatus.FAILED: "✗",
    StepStatus.PENDING: " ",
}
IMPORT_CHECK_TIMEOUT_S = 600.0


class Progress:
    """Step events as readable lines on a terminal, JSON lines otherwise (thread-safe)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._lock = threading.Lock()

    def __call__(
        self, name: str, status: StepStatus, detail: str, error: str | None, duration: float | None
    ) -> None:
        if self._tty:
            took = f" ({duration:.1f}s)" if duration is not None else ""
            text = error or detail
            line = f"  {MARKS[status]} {name}{took}{': ' + text if text else ''}"
        else:
            line = json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "event": "install_step",
                    "step": name,
                    "status": status.value,
                    "detail": detail,
                    "error": error,
                    "duration_s": duration,
                }
            )
        with self._lock:
            print(line, file=self._stream, flush=True)


def import_check(plan: NodePlan, report: InstallReport) -> dict[str, str]:
    """Node name -> import error, from a --quick-test-for-ci run of instance 0's command."""
    inst = plan.instances[0]
    write_extra_model_paths(plan.extra_model_paths, plan.extra_model_paths_yaml, plan.models_path)
    for directory in plan.instance_dirs:  # as `up` makes them: nodes may read them at import
        directory.mkdir(parents=True, exist_ok=True)
    argv = [*inst.argv, "--quick-test-for-ci"]
    env = {**plan.inherited_env(os.environ), **inst.env}
    try:
        # ComfyUI and whatever its nodes start, in one process group ended whole on the
        # timeout, when it exits, and when this command dies.
        proc = run_in_group(
            argv,
            cwd=inst.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=IMPORT_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"import check: ComfyUI did not finish loading its nodes in "
            f"{IMPORT_CHECK_TIMEOUT_S:.0f}s"
        ) from None
    output = proc.stdout + proc.stderr
    # Kept for the traceback behind each failure line.
    log_path = plan.log_dir / "install" / "import-check.log"
    atomic_write_text(log_path, output)
    result = parse_startup_log(output)
    if proc.returncode != 0 or not result.complete:
        tail = " | ".join(output.strip().splitlines()[-5:])
        raise InstallError(
            f"import check: ComfyUI exited {proc.returncode} before loading its "
            f"custom nodes: {tail}"
        )
    wanted = {n.name for n in report.nodes if n.status == NodeStatus.OK}
    return {name: error for name, error in result.failures.items() if name in wanted}


def run_install(
    settings: Settings, plan: NodePlan, check_imports: bool, stream: TextIO = sys.stdout
) -> int:
    """Install, then check imports; 0 only when every step and every node succeeded."""
    progress = Progress(stream)
    use_group_git(plan.run_dir)  # gitpython's git in its own process group, as in `up`
    report = Installer(install_inputs(settings), progress).run()
    failures = {
        n.name: f"{n.status}: {n.error}" for n in report.nodes if n.status in FAILED_NODE_STATES
    }
    if check_imports and plan.instances:
        started = time.monotonic()
        progress("import check", StepStatus.RUNNING, "", None, None)
        imports = import_check(plan, report)
        failures.update({name: f"import failed: {error}" for name, error in imports.items()})
        log_path = plan.log_dir / "install" / "import-check.log"
        if imports:
            failed = ", ".join(sorted(imports))
            progress(
                "import check",
                StepStatus.FAILED,
                "",
                f"{len(imports)} node(s) failed to import: {failed} (ComfyUI's output: {log_path})",
                time.monotonic() - started,
            )
        else:
            progress(
                "import check",
                StepStatus.DONE,
                "every custom node loaded",
                None,
                time.monotonic() - started,
            )
    for name, why in sorted(failures.items()):
        print(f"custom node {name} {why}", file=sys.stderr)
    state = "warm: nothing to do" if report.warm else "installed"
    declared = [n for n in report.nodes if n.enabled]
    print(
        f"ComfyUI at {report.comfyui_commit} ({state}); "
        f"{len(declared) - len(failures)} of {len(declared)} custom node(s) ok",
        file=sys.stderr,
    )
    return 1 if failures else 0
