"""MachineState: the one source of truth services write and health reads.

Owned by the agent's event loop; every write goes through a method or is followed by
``changed()``, which wakes requests waiting with ``?wait=``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum

from services.models.workflows import WorkflowRef
from services.plan import InstancePlan, ProxyPlan
from services.supervisor.states import EXITED_STATES, UP_STATES, ProcessState


class Phase(StrEnum):
    INITIALIZING = "INITIALIZING"
    INSTALLING = "INSTALLING"
    DOWNLOADING = "DOWNLOADING"
    STARTING = "STARTING"
    # Once instances run the reported phase is derived from them: READY, DEGRADED or FAILED.
    RUNNING = "RUNNING"
    READY = "READY"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    STOPPING = "STOPPING"


# The phases health bodies and metrics report; RUNNING never leaks (it shows as READY, DEGRADED
# or FAILED, derived from the instances).
REPORTED_PHASES = tuple(p for p in Phase if p is not Phase.RUNNING)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class StepState:
    """One boot step (clone, checkout, download, ...): what it did, how long, why it failed."""

    name: str
    status: StepStatus = StepStatus.PENDING
    started_at: float | None = None
    duration_s: float | None = None
    detail: str = ""
    error: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    at: float
    ok: bool
    duration_s: float
    error: str | None = None


class SmokeStatus(StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


@dataclass
class SmokeResult:
    """The functional check of one process (pid): a prompt that needs no model."""

    pid: int
    status: SmokeStatus
    started_at: float
    duration_s: float | None = None
    prompt_id: str | None = None
    error: str | None = None


@dataclass(kw_only=True)
class SupervisedProgram:
    """What the agent knows of one supervisord program's process (an instance, the proxy):
    its state and pid, restarts, why it does not run, and the agent's backoff of its starts."""

    process_state: ProcessState = ProcessState.STOPPED
    pid: int | None = None
    # Set the moment the agent sees the pid die, before supervisord reports the exit.
    pid_exited: bool = False
    restarts: int = 0
    started_at: float | None = None
    spawn_error: str | None = None
    exit_description: str | None = None
    # Why the agent does not start it (e.g. its port is taken), with a hint.
    blocked_reason: str | None = None
    log_tail: list[str] = field(default_factory=list)
    # Backoff (services/backoff.py): held starts since it last ran stable, and when the next
    # start is due (None: not held).
    attempt: int = 0
    next_start_at: float | None = None

    @property
    def process_alive(self) -> bool:
        """supervisord has it up and the agent has not seen its pid die."""
        return self.process_state in UP_STATES and self.pid is not None and not self.pid_exited

    @property
    def in_backoff(self) -> bool:
        """The agent holds its next start until ``next_start_at``."""
        return self.next_start_at is not None

    def late_exit(self, to_state: ProcessState, pid: int | None) -> bool:
        """An exit event of a predecessor that arrives after this live successor was adopted
        (supervisord's answers, which a refresh reads, race its events): it says nothing of
        this process, which must not be taken for the dead one."""
        return (
            to_state in EXITED_STATES
            and pid is not None
            and self.pid not in (None, pid)
            and self.process_alive
        )

    def adopt(self, pid: int, now: float) -> bool:
        """Record ``pid`` as its process; True when it is a new one (the old one's facts are
        forgotten and the caller watches this one)."""
        if self.pid == pid:
            return False
        self.pid = pid
        self.reset_runtime()
        self.log_tail = []
        self.started_at = now
        return True

    def reset_runtime(self) -> None:
        """Forget what was learned about the previous process (each kind adds its own)."""
        self.pid_exited = False


@dataclass
class ProxyState(SupervisedProgram):
    """The authenticating proxy (Caddy, COMFYUI_EXPOSE=proxy) in front of every instance: its
    process as supervisord and the agent's pidfd see it, and whether its public ports answer
    as they must (401 without the token). Written by services/proxy; one object, shared by
    every InstanceState (``InstanceState.proxy``), since one Caddy serves every public port."""

    plan: ProxyPlan
    # The pid whose every public port answered 401 to a request without the token.
    checked_pid: int | None = None
    check_failures: int = 0
    check_error: str | None = None

    @property
    def serving(self) -> bool:
        """Up, and its public ports answered for this very process (a single failed check is
        noise; two in a row take it out)."""
        return self.process_alive and self.checked_pid == self.pid and self.check_failures < 2

    def reset_runtime(self) -> None:
        super().reset_runtime()
        self.checked_pid = None
        self.check_failures = 0
        self.check_error = None


@dataclass
class InstanceState(SupervisedProgram):
    plan: InstancePlan
    last_probe: ProbeResult | None = None
    probe_failures: int = 0
    smoke: SmokeResult | None = None
    # COMFYUI_EXPOSE=proxy: the proxy in front of it (shared), and the smoke prompt of this
    # process sent once through it, with the token (proves the public path).
    proxy: ProxyState | None = None
    public_smoke: SmokeResult | None = None
    queue_pending: int | None = None
    queue_running: int | None = None
    # Why its GPU was taken out of service (NVML health or the self-test): never restarted.
    quarantined: str | None = None
    # An operator drained it (POST .../drain): it answers accepting: false until undrained.
    draining: bool = False
    # Backoff (services/backoff.py), besides attempt and next_start_at: the failures (FATAL,
    # early crashes) since it last ran INSTANCE_STABLE_SECS, how long the current wait is, and
    # when each crash of the streak happened.
    failures: int = 0
    backoff_s: float | None = None
    crash_times: list[float] = field(default_factory=list)
    backoff_starts: int = 0  # held starts the agent made since it started (a counter)
    # Models (issue 5): set when the manifest or a workflow needs this instance checked.
    model_check_needed: bool = False
    model_check_pid: int | None = None  # the process the last complete check was of
    model_check_generation: int = -1  # MachineState.models_generation it was checked at
    model_mismatches: list[str] = field(default_factory=list)  # required models not listed
    workflow_missing: list[WorkflowRef] = field(default_factory=list)

    def reset_runtime(self) -> None:
        """Forget what was learned about the previous process."""
        super().reset_runtime()
        self.last_probe = None
        self.probe_failures = 0
        self.smoke = None
        self.public_smoke = None
        self.queue_pending = None
        self.queue_running = None


@dataclass
class GpuStatus:
    """One physical GPU as NVML last saw it: identity, the latest sample, Xid counts and
    quarantine. Written by the GPU sampler (services/gpu/sampler.py); read by health and metrics.
    A quantity NVML could not read stays None and is left out of /metrics."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str = ""
    sampled_at: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    utilization_ratio: float | None = None  # 0-1, NVML utilization.gpu / 100
    memory_utilization_ratio: float | None = None  # 0-1, NVML utilization.memory / 100
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    ecc_corrected_total: int | None = None  # volatile (since driver load)
    ecc_uncorrected_total: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool | None = None
    row_remap_failed: bool | None = None
    retired_pages_pending: bool | None = None
    # Samples in a row the policy found unhealthy (hot, unanswered); GPU_UNHEALTHY_SAMPLES of
    # them quarantine the GPU, a healthy sample resets the count.
    unhealthy_samples: int = 0
    # Xid code -> events seen since the agent started (a counter, never a "last Xid" gauge).
    xid_counts: dict[int, int] = field(default_factory=dict)
    quarantined: bool = False
    quarantine_reason: str | None = None
    lost: str | None = None
    throttle_reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    mig_mode: bool | None = None
    driver_version: str = ""
    cuda_version: str = ""
    selftest: dict[str, object] | None = None  # the sentinel self-test's report, when run


class NodeStatus(StrEnum):
    """A custom node's status (health JSON and the lock carry the value)."""

    PENDING = "pending"  # installing
    OK = "ok"
    FAILED = "failed"  # its install or its import failed
    SKIPPED = "skipped"  # its requirements conflict and on_conflict = skip-node
    DISABLED = "disabled"


@dataclass
class CustomNodeState:
    """A custom node as installed and as ComfyUI loaded it."""

    name: str
    url: str
    ref: str
    required: bool
    enabled: bool
    commit: str | None = None
    status: NodeStatus = NodeStatus.OK
    error: str | None = None
    import_checked: bool = False
    import_failed: bool = False  # the failure is ComfyUI's import, which a restart re-checks
    transient: bool = False  # its install failed on the network: the boot retries the install
    source: str = "git"  # or "registry" (Comfy Registry): then url is the archive's
    registry_id: str | None = None
    version: str | None = None  # the registry version installed
    sha256: str | None = None  # of the registry archive


class ModelStatus(StrEnum):
    """A manifest model's status (the health JSON carries the value)."""

    MISSING = "missing"  # not fetched yet
    DOWNLOADING = "downloading"
    VERIFIED = "verified"  # on disk with the manifest's size and/or sha256 checked
    # On disk, whole as the server framed it (a 200 with its Content-Length or chunked end),
    # but the manifest gives neither sha256 nor size to check it against: present (it counts
    # for readiness) yet said to be unchecked in health and metrics.
    UNVERIFIED = "unverified"
    FAILED = "failed"


# On disk and usable by the instances.
PRESENT_MODEL_STATUSES = frozenset({ModelStatus.VERIFIED, ModelStatus.UNVERIFIED})


@dataclass
class ModelState:
    """One manifest model: verified, unverified, downloading, missing or failed, with its
    progress."""

    name: str  # folder/filename
    folder: str
    filename: str
    url: str  # without credentials or query string
    path: str
    required: bool
    when: str
    size: int | None
    sha256: str | None
    status: ModelStatus = ModelStatus.MISSING
    bytes_done: int = 0
    bytes_total: int | None = None
    session_bytes: int = 0  # downloaded by this process, for the rate
    started_at: float | None = None
    finished_at: float | None = None
    verified_sha256: str | None = None
    error: str | None = None

    @property
    def present(self) -> bool:
        """On disk for the instances: verified, or unverified (no sha256/size to check)."""
        return self.status in PRESENT_MODEL_STATUSES

    def rate_bps(self, now: float) -> float | None:
        if self.started_at is None or self.status != ModelStatus.DOWNLOADING:
            return None
        elapsed = now - self.started_at
        return self.session_bytes / elapsed if elapsed > 0 else None


@dataclass
class MachineState:
    phase: Phase = Phase.INITIALIZING
    boot_started_at: float = field(default_factory=time.time)
    error: str | None = None
    failed_step: str | None = None
    install_steps: list[StepState] = field(default_factory=list)
    # The install phase's attempts (INSTALL_RETRIES retries after a transient failure), the
    # transient error that made the last retry, and when the next attempt starts.
    install_attempts: int = 0
    install_retry_error: str | None = None
    install_next_attempt_at: float | None = None
    custom_nodes: dict[str, CustomNodeState] = field(default_factory=dict)
    # Keyed by InstancePlan.gpu: the GPU's NVML index (0..N-1 in CPU mode), as in the URLs.
    instances: dict[int, InstanceState] = field(default_factory=dict)
    # COMFYUI_EXPOSE=proxy: the proxy every instance's public port goes through.
    proxy: ProxyState | None = None
    supervisor_expected: bool = False
    supervisor_up: bool = False
    max_queue_depth: int | None = None
    models_configured: bool = False
    # Manifest models by name (folder/filename), workflow references, download counter.
    models: dict[str, ModelState] = field(default_factory=dict)
    models_generation: int = 0  # bumped whenever a model becomes verified or stops being so
    workflow_refs: list[WorkflowRef] = field(default_factory=list)
    workflow_errors: list[str] = field(default_factory=list)
    download_bytes_total: int = 0
    # Physical GPUs by NVML index (empty in CPU mode and until the GPU sampler lands).
    gpus: dict[int, GpuStatus] = field(default_factory=dict)
    # The workspace disk, checked every few seconds (services/disk.py): free bytes (None until
    # checked or when unreadable) and whether that is below the full mark.
    workspace_path: str = ""
    workspace_free_bytes: int | None = None
    workspace_full: bool = False
    # SIGTERM: the node stopped accepting and waits for running and queued prompts (drain).
    draining: bool = False
    drain_started_at: float | None = None
    drain_deadline: float | None = None
    version: int = 0
    _changed: asyncio.Event | None = field(default=None, repr=False)

    def changed(self) -> None:
        """Record that something changed and wake every waiter."""
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self, seconds: float) -> bool:
        """Wait until the next change or ``seconds``; True if something changed."""
        if self._changed is None:
            self._changed = asyncio.Event()
        event = self._changed
        try:
            # Not asyncio.wait_for: on 3.11 it swallows a cancel that races the event being set.
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def set_phase(self, phase: Phase, error: str | None = None, step: str | None = None) -> None:
        self.phase = phase
        if error is not None:
            self.error = error
            self.failed_step = step
        self.changed()

    def step(self, name: str) -> StepState:
        """The install step called ``name``, created pending if new."""
        for existing in self.install_steps:
            if existing.name == name:
                return existing
        created = StepState(name)
        self.install_steps.append(created)
        return created
