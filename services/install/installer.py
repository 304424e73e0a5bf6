"""The install phase: ComfyUI and custom nodes at pinned commits, one Python environment with
one resolution, install.py per node, and a lock so a warm boot checks instead of redoing.

Blocking (git, uv, subprocesses): the boot runs it in a worker thread and turns the step
callbacks into MachineState updates."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from config.errors import DiskFullError, InstallError
from config.nodes import REGISTRY, CustomNodeSpec
from services.files import atomic_write_text, open_private
from services.install import pyenv
from services.install.git import (
    CheckoutAction,
    CheckoutResult,
    GitOptions,
    checkout_intact,
    ensure_checkout,
    resolve_ref,
)
from services.install.inputs import InstallInputs
from services.install.lock import (
    Lock,
    LockedNode,
    LockedRepo,
    ScriptStatus,
    digest,
    read_lock,
    write_lock,
)
from services.install.registry import (
    RegistryJob,
    RegistryPin,
    RegistryResult,
    install_node,
    registry_intact,
)
from services.install.requirements import (
    RequirementsFile,
    check_requirements,
    outside_problems,
)
from services.install.resolve import Conflict, resolve
from services.process_group import run_in_group
from services.state import CustomNodeState, NodeStatus, StepStatus

log = logging.getLogger(__name__)

StepCallback = Callable[[str, StepStatus, str, "str | None", "float | None"], None]
DISABLED_DIR = ".disabled"  # ComfyUI skips custom_nodes entries ending in ".disabled"


def node_state(spec: CustomNodeSpec, status: NodeStatus | None = None) -> CustomNodeState:
    """A declared node's state before the install says more: ``status``, or ok / disabled."""
    return CustomNodeState(
        spec.name,
        spec.url,
        spec.ref,
        spec.required,
        spec.enabled,
        status=status or (NodeStatus.OK if spec.enabled else NodeStatus.DISABLED),
        source=spec.kind,
        registry_id=spec.registry_id,
    )


def locked_pin(node: LockedNode) -> RegistryPin | None:
    """The registry pin a lock entry records; None for a git node or an incomplete entry."""
    if node.source != REGISTRY or not (node.registry_id and node.version and node.sha256):
        return None
    return RegistryPin(node.registry_id, node.version, node.sha256, node.url,
                       node.registry_url or "")


NodeResult = CheckoutResult | RegistryResult


@dataclass
class StepRun:
    """What a running step did, as its body says: a detail, and whether there was nothing to
    do (skipped)."""

    detail: str = ""
    skipped: bool = False

    def finish(self, detail: str, skipped: bool = False) -> None:
        self.detail, self.skipped = detail, skipped


@dataclass
class InstallReport:
    comfyui_commit: str
    nodes: list[CustomNodeState] = field(default_factory=list)
    warm: bool = False  # everything matched the lock: nothing was redone


class Installer:
    """Runs the install phase once; report steps through ``on_step``."""

    def __init__(self, inputs: InstallInputs, on_step: StepCallback) -> None:
        self.inputs = inputs
        self._on_step = on_step
        self._failed_scripts: set[str] = set()
        self._outcomes = {n.name: node_state(n) for n in inputs.nodes}
        self._pins: dict[str, RegistryPin] = {}  # registry nodes: what the lock records

    # -- step bookkeeping ---------------------------------------------------------------
    @contextmanager
    def _step(self, name: str) -> Iterator[StepRun]:
        """The body runs as step ``name``: reported running, then done or skipped with the
        detail the body gave (``StepRun.finish``), or failed with its InstallError."""
        started = time.monotonic()
        self._on_step(name, StepStatus.RUNNING, "", None, None)
        run = StepRun()
        try:
            yield run
        except InstallError as exc:
            self._on_step(name, StepStatus.FAILED, "", str(exc), time.monotonic() - started)
            raise
        status = StepStatus.SKIPPED if run.skipped else StepStatus.DONE
        self._on_step(name, status, run.detail, None, time.monotonic() - started)

    def _fail_node(self, name: str, error: str, transient: bool = False) -> None:
        outcome = self._outcomes[name]
        outcome.status, outcome.error = NodeStatus.FAILED, error
        outcome.transient = transient
        log.error("custom node failed", extra={"fields": {"node": name, "error": error}})

    # -- the phase ------------------------------------------------------------------------
    def run(self) -> InstallReport:
        """Install or verify everything; raises InstallError when ComfyUI itself cannot run."""
        return self.verify() or self.install()

    def verify(self) -> InstallReport | None:
        """The warm boot: every tree and the environment as locked for these inputs (read
        only; no remote asked). None when something must be installed."""
        lock = read_lock(self.inputs.lock_path)
        if lock and lock.inputs_hash == self.inputs.digest() and self._warm_ok(lock):
            return self._warm_report(lock)
        return None

    def install(self) -> InstallReport:
        """Clone, check out, resolve and install what the inputs ask for, then write the lock;
        raises InstallError when ComfyUI itself cannot run."""
        inputs = self.inputs
        lock = read_lock(inputs.lock_path)
        self._check_disk()
        comfyui, node_results = self._checkouts(lock)
        self._disable_unwanted(lock)
        with self._step("python environment") as step:
            self._python_env(step)
        requirements_hash, installed = self._requirements(lock)
        self._install_scripts(lock, node_results)
        # The commit (or registry archive) on disk, checked after everything that ran in the
        # trees.
        for name, result in node_results.items():
            if self._outcomes[name].status != NodeStatus.OK:
                continue
            dest = inputs.custom_nodes_dir / name
            if isinstance(result, RegistryResult):
                intact = registry_intact(dest, result.pin)
                where = f"{result.pin.registry_id} {result.pin.version} as unpacked"
            else:
                intact, where = checkout_intact(dest, result.commit), f"at {result.commit}"
            if not intact:
                self._fail_node(
                    name,
                    f"custom_nodes/{name} is no longer {where} "
                    "after its install (its install.py changed it?)",
                )
        nodes = {n.name: self._locked_node(n) for n in self._outcomes.values()}
        write_lock(
            inputs.lock_path,
            Lock(
                inputs_hash=inputs.digest(),
                comfyui=LockedRepo(inputs.comfyui_url, inputs.comfyui_ref, comfyui.commit),
                nodes=nodes,
                python=str(inputs.python),
                requirements_hash=requirements_hash,
                packages=installed,
            ),
        )
        return InstallReport(comfyui.commit, list(self._outcomes.values()))

    def _locked_node(self, n: CustomNodeState) -> LockedNode:
        node = LockedNode(
            n.url,
            n.ref,
            n.commit or "",
            n.enabled,
            install_py=self._script_status(n.name),
            skipped_reason=n.error if n.status == NodeStatus.SKIPPED else None,
            status=n.status,
        )
        if n.source == REGISTRY:
            pin = self._pins.get(n.name)
            node.source, node.registry_id = REGISTRY, n.registry_id
            node.registry_url = pin.registry_url if pin else self.inputs.registry_url
            if pin is not None:  # a failed node keeps the pin it had: a re-download must match
                node.url, node.version, node.sha256 = pin.download_url, pin.version, pin.sha256
        return node

    def _intact(self, name: str, node: LockedNode) -> Callable[[], bool]:
        """The warm-boot check of one locked node: a git tree at its commit, a registry node's
        files as unpacked from its archive (neither asks a remote)."""
        dest = self.inputs.custom_nodes_dir / name
        if node.source == REGISTRY:
            pin = locked_pin(node)
            return partial(registry_intact, dest, pin) if pin else lambda: False
        return partial(checkout_intact, dest, node.commit)

    def _warm_ok(self, lock: Lock) -> bool:
        """Every tree at its locked commit and clean, every node fine, the environment as locked."""
        if any(n.status == NodeStatus.FAILED for n in lock.nodes.values()):
            return False
        checks = [partial(checkout_intact, self.inputs.install_path, lock.comfyui.commit)] + [
            self._intact(name, node)
            for name, node in lock.nodes.items()
            if node.enabled and node.skipped_reason is None
        ]
        with ThreadPoolExecutor(self.inputs.workers) as pool:
            intact = list(pool.map(lambda check: check(), checks))
        if not all(intact):
            return False
        try:
            return pyenv.installed(self.inputs.python) == lock.packages
        except InstallError:
            return False

    def _warm_report(self, lock: Lock) -> InstallReport:
        count = sum(1 for n in lock.nodes.values() if n.enabled)
        self._on_step(
            "checkout ComfyUI",
            StepStatus.SKIPPED,
            f"skipped: at {lock.comfyui.commit} as locked",
            None,
            0.0,
        )
        self._on_step(
            "custom nodes",
            StepStatus.SKIPPED,
            f"skipped: {count} node(s) at their locked commits or registry versions",
            None,
            0.0,
        )
        self._on_step(
            "python environment",
            StepStatus.SKIPPED,
            f"skipped: {len(lock.packages)} packages as locked",
            None,
            0.0,
        )
        for name, node in lock.nodes.items():
            outcome = self._outcomes[name]
            outcome.commit = node.commit
            if node.source == REGISTRY:
                outcome.url, outcome.version, outcome.sha256 = node.url, node.version, node.sha256
            if node.skipped_reason:
                outcome.status, outcome.error = NodeStatus.SKIPPED, node.skipped_reason
        return InstallReport(lock.comfyui.commit, list(self._outcomes.values()), warm=True)

    def _check_disk(self) -> None:
        self.inputs.workspace.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.inputs.workspace).free
        if free < self.inputs.min_free_bytes:
            raise DiskFullError(
                f"only {free / 2**30:.1f} GiB free in {self.inputs.workspace}, "
                f"{self.inputs.min_free_bytes / 2**30:.1f} GiB needed (INSTALL_MIN_FREE_GB); "
                "free some space or use a larger volume"
            )

    def _target(
        self, lock_repo: LockedRepo | None, url: str, ref: str, what: str, options: GitOptions
    ) -> str:
        # Same url and ref as locked: keep the locked commit (a branch does not move under us).
        if lock_repo and lock_repo.url == url and lock_repo.ref == ref and lock_repo.commit:
            return lock_repo.commit
        return resolve_ref(url, ref, what, options)

    def _checkouts(self, lock: Lock | None) -> tuple[CheckoutResult, dict[str, NodeResult]]:
        """ComfyUI and every enabled node, in parallel; a node's failure is that node's."""
        inputs = self.inputs
        # ComfyUI first: the nodes are cloned inside its tree.
        options = inputs.git_options(inputs.comfyui_auth)
        with self._step("checkout ComfyUI") as step:
            target = self._target(
                lock.comfyui if lock else None,
                inputs.comfyui_url,
                inputs.comfyui_ref,
                "ComfyUI",
                options,
            )
            main = self._checkout(
                step,
                inputs.comfyui_url,
                inputs.comfyui_ref,
                inputs.install_path,
                "ComfyUI",
                target,
                options,
            )
        enabled = [n for n in inputs.nodes if n.enabled]
        with ThreadPoolExecutor(inputs.workers) as pool:
            results = dict(
                zip(
                    [n.name for n in enabled],
                    pool.map(lambda spec: self._node_checkout(lock, spec), enabled),
                    strict=True,
                )
            )
        return main, {k: v for k, v in results.items() if v is not None}

    def _node_checkout(self, lock: Lock | None, spec: CustomNodeSpec) -> NodeResult | None:
        """The node's checkout (or registry archive); None (and the node failed) when it cannot
        be had."""
        if spec.kind == REGISTRY:
            return self._registry_node(lock, spec)
        what = f"custom node {spec.name}"
        locked = lock.nodes.get(spec.name) if lock else None
        options = self.inputs.git_options(self.inputs.node_auth.get(spec.name))
        try:
            with self._step(f"checkout {spec.name}") as step:
                target = self._target(locked, spec.url, spec.ref, what, options)
                result = self._checkout(
                    step,
                    spec.url,
                    spec.ref,
                    self.inputs.custom_nodes_dir / spec.name,
                    what,
                    target,
                    options,
                )
        except InstallError as exc:
            self._fail_node(spec.name, str(exc), exc.transient)
            return None
        self._outcomes[spec.name].commit = result.commit
        return result

    def _registry_node(self, lock: Lock | None, spec: CustomNodeSpec) -> RegistryResult | None:
        """A Comfy Registry node: kept as locked while its entry is unchanged and its files are
        intact (no request), else resolved, downloaded and unpacked; None when it failed."""
        locked = lock.nodes.get(spec.name) if lock else None
        pin = locked_pin(locked) if locked else None
        if pin is not None and (
            pin.registry_id != spec.registry_id
            or locked is None
            or locked.ref != spec.ref
            or pin.registry_url != self.inputs.registry_url
        ):
            pin = None  # another id, version or registry: resolved anew
        assert spec.registry_id is not None
        job = RegistryJob(
            name=spec.name,
            registry_id=spec.registry_id,
            requested=spec.requested_version,
            dest=self.inputs.custom_nodes_dir / spec.name,
            registry_url=self.inputs.registry_url,
            locked=pin,
            options=self.inputs.registry_options,
            max_bytes=self.inputs.max_unpacked_bytes,
            replaceable=locked is not None,
        )
        step_name = f"fetch {spec.name}"
        if pin is not None:
            self._pins[spec.name] = pin  # kept even if this attempt fails
        try:
            with self._step(step_name) as step:
                result = install_node(
                    job, lambda detail: self._on_step(step_name, StepStatus.RUNNING, detail,
                                                      None, None)
                )
                step.finish(result.detail, result.action == "skipped")
        except InstallError as exc:
            self._fail_node(spec.name, str(exc), exc.transient)
            return None
        self._pins[spec.name] = result.pin
        outcome = self._outcomes[spec.name]
        outcome.url, outcome.version = result.pin.download_url, result.pin.version
        outcome.sha256 = result.pin.sha256
        return result

    def _checkout(
        self,
        step: StepRun,
        url: str,
        ref: str,
        dest: Path,
        what: str,
        target: str,
        options: GitOptions,
    ) -> CheckoutResult:
        result = ensure_checkout(url, ref, dest, what, target, options)
        step.finish(_checkout_detail(result), result.action == CheckoutAction.SKIPPED)
        return result

    def _disable_unwanted(self, lock: Lock | None) -> None:
        """Move nodes that are disabled, or no longer declared but were ours, out of ComfyUI's
        sight (custom_nodes/.disabled/), so it does not import them."""
        declared = {n.name: n for n in self.inputs.nodes}
        ours = set(lock.nodes) if lock else set()
        for name in sorted(ours | set(declared)):
            spec = declared.get(name)
            if spec is not None and spec.enabled:
                continue
            self._move_aside(name, "disabled" if spec else "no longer declared")

    def _move_aside(self, name: str, why: str) -> None:
        src = self.inputs.custom_nodes_dir / name
        if not src.exists():
            return
        dest = self.inputs.custom_nodes_dir / DISABLED_DIR / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        src.rename(dest)
        log.info("custom node moved aside", extra={"fields": {"node": name, "why": why}})

    def _python_env(self, step: StepRun) -> None:
        inputs = self.inputs
        if inputs.venv is None:
            if not pyenv.python_works(inputs.python):
                raise InstallError(
                    f"COMFYUI_PYTHON={inputs.python} does not run; point it at "
                    "a working Python interpreter or unset it"
                )
            step.finish(f"skipped: using {inputs.python} as is", skipped=True)
        elif pyenv.ensure_venv(inputs.venv, inputs.base_python):
            step.finish(f"created {inputs.venv}")
        else:
            step.finish(f"skipped: {inputs.venv} present", skipped=True)

    def _requirement_files(self) -> tuple[RequirementsFile | None, list[RequirementsFile]]:
        comfyui_file = None
        path = self.inputs.install_path / "requirements.txt"
        if path.exists():
            comfyui_file, problems = check_requirements("ComfyUI", path, path.read_text())
            if problems:
                raise InstallError("; ".join(str(p) for p in problems))
        files = []
        for name, outcome in self._outcomes.items():
            root = self.inputs.custom_nodes_dir / name
            path = root / "requirements.txt"
            if outcome.status != NodeStatus.OK or not (path.exists() or path.is_symlink()):
                continue
            # Before anything reads it: a node's requirements stay inside the node.
            outside, includes = outside_problems(name, path, root)
            if outside:
                self._refuse_node(name, "; ".join(str(p) for p in outside))
                continue
            parsed, problems = check_requirements(name, path, path.read_text())
            if problems:
                self._fail_node(name, "; ".join(str(p) for p in problems))
                continue
            files.append(replace(parsed, includes=tuple(includes)))
        return comfyui_file, files

    def _refuse_node(self, name: str, problems: str) -> None:
        """A node whose requirements reach outside it: failed, or with on_conflict =
        "skip-node" skipped and moved aside like a conflicting node."""
        error = f"requirements refused: {problems}"
        if self.inputs.on_conflict != "skip-node":
            self._fail_node(name, error)
            return
        outcome = self._outcomes[name]
        outcome.status, outcome.error = NodeStatus.SKIPPED, error
        log.warning("custom node skipped", extra={"fields": {"node": name, "error": error}})
        self._move_aside(name, "requirements refused")

    def _requirements(self, lock: Lock | None) -> tuple[str, dict[str, str]]:
        """Resolve ComfyUI's and every node's requirements together, torch family protected,
        then install the result; skipped when nothing changed since the lock."""
        inputs = self.inputs
        base, node_files = self._requirement_files()
        packages = pyenv.installed(inputs.python)
        pins = pyenv.constraints(packages, list(inputs.protected))
        excluded = pyenv.excluded(packages)
        run_dir = inputs.workspace / "run"
        atomic_write_text(run_dir / "constraints.txt", "".join(f"{p}\n" for p in pins))
        atomic_write_text(run_dir / "excludes.txt", "".join(f"{e}\n" for e in excluded))
        files = ([base] if base else []) + node_files
        req_hash = self._requirements_hash(files, packages)
        if lock and lock.requirements_hash == req_hash and packages == lock.packages:
            for step in ("resolve", "install"):
                self._on_step(
                    step,
                    StepStatus.SKIPPED,
                    f"skipped: {len(files)} requirement file(s) unchanged, environment as locked",
                    None,
                    0.0,
                )
            return req_hash, packages
        protection = f"pinned: {', '.join(pins) or '-'}; kept out: {', '.join(excluded) or '-'}"
        with self._step("resolve") as step:
            resolved = resolve(
                inputs.python,
                base,
                node_files,
                run_dir / "constraints.txt",
                run_dir / "excludes.txt",
            )
            self._apply_conflicts(resolved.conflicts)
            names = [c.owner for c in resolved.conflicts]
            skipped = f"; skipped for conflicts: {', '.join(names)}" if names else ""
            step.finish(
                f"{len(resolved.resolution.files)} requirement file(s) in one resolution "
                f"({protection}){skipped}"
            )
        with self._step("install") as step:
            result = pyenv.install(inputs.python, resolved.resolution)
            if not result.ok:
                raise InstallError(f"requirements: uv pip install failed: {result.cause}")
            step.finish(pyenv.summary(result))
        packages = pyenv.installed(inputs.python)
        files = ([base] if base else []) + [
            f for f in node_files if self._outcomes[f.owner].status == NodeStatus.OK
        ]
        return self._requirements_hash(files, packages), packages

    def _apply_conflicts(self, conflicts: tuple[Conflict, ...]) -> None:
        """on_conflict: skip-node disables the conflicting nodes (the rest installs); fail
        names them all."""
        if self.inputs.on_conflict == "skip-node":
            for conflict in conflicts:
                outcome = self._outcomes[conflict.owner]
                outcome.status, outcome.error = NodeStatus.SKIPPED, conflict.message
                self._move_aside(conflict.owner, "requirements conflict")
        if conflicts and self.inputs.on_conflict == "fail":
            raise InstallError(
                'requirements conflict (on_conflict = "fail"; set '
                '"skip-node" to install the rest): ' + " | ".join(c.message for c in conflicts)
            )

    def _requirements_hash(self, files: list[RequirementsFile], packages: dict[str, str]) -> str:
        # The pins and exclusions follow from the environment: hashing them as they are after
        # an install is what the next boot computes from an unchanged environment.
        pins = pyenv.constraints(packages, list(self.inputs.protected))
        return digest(
            [[f.owner, f.path.read_text(), *(p.read_text() for p in f.includes)] for f in files]
            + pins
            + pyenv.excluded(packages)
        )

    def _script_status(self, name: str) -> ScriptStatus:
        if not (self.inputs.custom_nodes_dir / name / "install.py").exists():
            return ScriptStatus.NONE
        return ScriptStatus.FAILED if name in self._failed_scripts else ScriptStatus.OK

    def _install_scripts(self, lock: Lock | None, results: dict[str, NodeResult]) -> None:
        """Each node's install.py, after the requirements, if its commit (or registry archive)
        is new or it failed."""
        for name, result in results.items():
            outcome = self._outcomes[name]
            script = self.inputs.custom_nodes_dir / name / "install.py"
            locked = lock.nodes.get(name) if lock else None
            if outcome.status != NodeStatus.OK or not script.exists():
                continue
            same = (
                locked is not None and locked.sha256 == result.pin.sha256
                if isinstance(result, RegistryResult)
                else locked is not None and locked.commit == result.commit
            )
            if locked and same and locked.install_py == ScriptStatus.OK:
                continue
            try:
                with self._step(f"install.py {name}") as step:
                    step.finish(self._run_script(name, script))
            except InstallError as exc:
                self._failed_scripts.add(name)
                self._fail_node(name, str(exc))

    def _run_script(self, name: str, script: Path) -> str:
        log_path = self.inputs.workspace / "logs" / "install" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = self.inputs.install_py_timeout
        # The node's own code: none of the secrets the instances do not get either.
        env = {k: v for k, v in os.environ.items() if k not in self.inputs.withheld_env}
        with open_private(log_path, "wb") as out:
            try:
                # In its own process group, ended whole (what it started in the background too)
                # on the timeout, when it exits, and when the agent dies, even by SIGKILL.
                proc = run_in_group(
                    [str(self.inputs.python), script.name],
                    cwd=script.parent,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                raise InstallError(
                    f"custom node {name}: install.py did not finish in "
                    f"{timeout:.0f}s (INSTALL_PY_TIMEOUT); see {log_path}"
                ) from None
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise InstallError(
                f"custom node {name}: install.py exited {proc.returncode}: "
                f"{' | '.join(tail)} (log: {log_path})"
            )
        return f"ok (log {log_path})"


def _checkout_detail(result: CheckoutResult) -> str:
    note = " (local edits stashed)" if result.stashed else ""
    if result.action == CheckoutAction.SKIPPED:
        return f"skipped: at {result.commit}"
    return f"{result.action} at {result.commit}{note}"
