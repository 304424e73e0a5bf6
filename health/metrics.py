"""Prometheus metrics: a Collector that reads MachineState at scrape time.

There is no second bookkeeping: every value is read from the state when Prometheus scrapes,
and ``collect()`` does no I/O (the state is in memory, owned by the agent's event loop, which
is also where the scrape runs). Families are built fresh each scrape.

Placeholders for features not built yet keep their names and labels stable, so dashboards and
alert rules written today keep working when the features land:
- ``comfy_machine_custom_node_import_failed{node}``: one series per enabled custom node in
  ``MachineState.custom_nodes`` (none until the installer fills it).
- ``comfy_machine_model_verified{model}``: one series per manifest model (none without a
  manifest); ``comfy_machine_model_unverified{model}`` is 1 for a model on disk that the
  manifest gives no sha256 or size to check; ``comfy_machine_models_required_missing`` counts
  required models not on disk (an unverified one is on disk);
  ``comfy_machine_download_bytes_total`` counts model bytes downloaded by this agent.
- ``comfy_machine_gpu_xid_errors_total``: 0 for every GPU and the catalogued Xid codes until
  the GPU sampler (services/gpu/sampler.py) counts events into ``MachineState.gpus``.
- The NVML gauges (temperature, power, ...): series only for GPUs with a sample in
  ``MachineState.gpus`` (see deploy/README-metrics.md for the DCGM map).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from health import checks
from services.gpu.policy import XID_CODES_AT_ZERO
from services.state import (
    REPORTED_PHASES,
    GpuStatus,
    InstanceState,
    MachineState,
    ModelStatus,
    SmokeStatus,
    StepStatus,
)
from services.supervisor.states import ProcessState

PREFIX = "comfy_machine_"
# ``gpu`` is the NVML index on every series (instance and GPU alike), so they join on it.
INSTANCE_LABELS = ("gpu", "name", "port")
# The labels dcgm-exporter puts on every GPU series, so existing dashboards join on them.
DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")
# Xid codes whose counters exist at 0 from the start (any other code appears when first seen):
# the catalogue of the GPU health policy (services/gpu/policy.py).
PROCESS_STATES = tuple(ProcessState)


def _version() -> str:
    try:
        return metadata.version("comfy-machine")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _host() -> str:
    # dcgm-exporter's Hostname label is the node name in Kubernetes (NODE_NAME), else the host's.
    return os.environ.get("NODE_NAME") or socket.gethostname()


def _bool(value: bool) -> float:
    return 1.0 if value else 0.0


@dataclass(frozen=True)
class _GpuRow:
    """A GPU's labels and, when NVML has sampled it, its status."""

    labels: tuple[str, ...]
    index: str
    uuid: str
    status: GpuStatus | None


def _instance_gauge(name: str, doc: str, extra: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=[*INSTANCE_LABELS, *extra])


class MachineCollector(Collector):
    """Builds every ``comfy_machine_*`` family from ``state`` at each scrape."""

    def __init__(
        self,
        state: MachineState,
        hostname: str | None = None,
        version: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        # Read once: collect() must not do I/O, and neither changes while the agent runs.
        self._hostname = hostname if hostname is not None else _host()
        self._version = version if version is not None else _version()
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        """Every family, read from the state now (called by the registry at each scrape)."""
        yield from self._node()
        instances = [inst for _, inst in sorted(self._state.instances.items())]
        yield from self._instances(instances)
        yield from self._instance_probes(instances)
        yield from self._proxy()
        yield from self._install()
        yield from self._models()
        yield from self._gpus(instances)

    def _node(self) -> Iterator[Metric]:
        state = self._state
        info = InfoMetricFamily(
            PREFIX + "build", "comfy-machine version and Python version of the agent"
        )
        info.add_metric([], {"version": self._version, "python_version": platform.python_version()})
        yield info
        phase = GaugeMetricFamily(
            PREFIX + "phase",
            "The phase the health API reports: 1 for the current one, 0 for the others",
            labels=["phase"],
        )
        current = checks.reported_phase(state, self._clock())
        for p in REPORTED_PHASES:
            phase.add_metric([p.value], _bool(p.value == current))
        yield phase
        yield GaugeMetricFamily(
            PREFIX + "boot_start_time_seconds",
            "Unix time the agent started booting",
            value=state.boot_started_at,
        )
        yield GaugeMetricFamily(
            PREFIX + "supervisor_up",
            "1 while supervisord runs; 0 before it is started and after it died or stopped",
            value=_bool(state.supervisor_up),
        )
        if state.workspace_free_bytes is not None:  # checked every few seconds by the agent
            yield GaugeMetricFamily(
                PREFIX + "workspace_free_bytes",
                "Free bytes on the workspace disk (instance logs, outputs, the install lock)",
                value=float(state.workspace_free_bytes),
            )

    def _instances(self, instances: list[InstanceState]) -> Iterator[Metric]:
        """Per instance: identity, process state, readiness, restarts and backoff."""
        gauge = _instance_gauge
        info = gauge(
            "instance_info",
            "Always 1: an instance's GPU UUID, GPU model and URL",
            ("uuid", "gpu_name", "url"),
        )
        states = gauge(
            "instance_state",
            "supervisord's state of the instance: 1 for the current one, 0 for the others",
            ("state",),
        )
        ready = gauge(
            "instance_ready",
            "1 when the instance can run a job (process up, smoke "
            "prompt passed for this process, probes answering)",
        )
        accepting = gauge("instance_accepting", "1 when ready and below MAX_QUEUE_DEPTH")
        restarts = CounterMetricFamily(
            PREFIX + "instance_restarts",
            "Restarts of the instance by supervisord since the agent started",
            labels=list(INSTANCE_LABELS),
        )
        start = gauge("instance_start_time_seconds", "Unix time the current process started")
        backoff_starts = CounterMetricFamily(
            PREFIX + "instance_backoff_starts",
            "Starts the agent held back and then made after a backoff (a FATAL instance or a "
            "crash loop) since the agent started",
            labels=list(INSTANCE_LABELS),
        )
        attempt = gauge(
            "instance_backoff_attempt",
            "Held starts in the instance's current streak of failures (0: none; reset once it "
            "runs INSTANCE_STABLE_SECS)",
        )
        next_start = gauge(
            "instance_next_start_time_seconds",
            "Unix time the agent starts the instance again after its backoff (only while held)",
        )
        for inst in instances:
            plan = inst.plan
            key = [str(plan.gpu), plan.name, str(plan.port)]
            info.add_metric([*key, plan.gpu_uuid, plan.gpu_name, plan.url], 1.0)
            for s in PROCESS_STATES:
                states.add_metric([*key, s.name], _bool(s is inst.process_state))
            is_ready = checks.instance_ready(inst)
            ready.add_metric(key, _bool(is_ready))
            accepting.add_metric(
                key, _bool(checks.instance_accepting(
                    inst, self._state.max_queue_depth, self._state.draining))
            )
            restarts.add_metric(key, float(inst.restarts))
            if inst.started_at is not None:
                start.add_metric(key, inst.started_at)
            backoff_starts.add_metric(key, float(inst.backoff_starts))
            attempt.add_metric(key, float(inst.attempt))
            if inst.next_start_at is not None:
                next_start.add_metric(key, inst.next_start_at)
        yield from (info, states, ready, accepting, restarts, start)
        yield from (backoff_starts, attempt, next_start)

    def _instance_probes(self, instances: list[InstanceState]) -> Iterator[Metric]:
        """Per instance: what its probes, smoke prompt and live queue last saw."""
        gauge = _instance_gauge
        pending = gauge("instance_queue_pending", "Prompts waiting in the instance's /queue")
        running = gauge("instance_queue_running", "Prompts running in the instance's /queue")
        probe = gauge(
            "probe_duration_seconds",
            "Duration of the last probe of /system_stats and /queue (the state keeps only the "
            "last one, so this is a gauge, not a histogram)",
        )
        probe_ok = gauge("probe_success", "1 if the last probe of the instance answered")
        probe_fail = gauge(
            "probe_consecutive_failures",
            "Probes in a row that failed (2 take a ready instance out)",
        )
        smoke = gauge(
            "smoke_duration_seconds",
            "Duration of the smoke prompt (EmptyImage -> SaveImage) of the current process",
        )
        smoke_ok = gauge("smoke_passed", "1 if the current process passed its smoke prompt")
        for inst in instances:
            key = [str(inst.plan.gpu), inst.plan.name, str(inst.plan.port)]
            if inst.queue_pending is not None:
                pending.add_metric(key, float(inst.queue_pending))
            if inst.queue_running is not None:
                running.add_metric(key, float(inst.queue_running))
            if inst.last_probe is not None:
                probe.add_metric(key, inst.last_probe.duration_s)
                probe_ok.add_metric(key, _bool(inst.last_probe.ok))
            probe_fail.add_metric(key, float(inst.probe_failures))
            current = inst.smoke if inst.smoke is not None and inst.smoke.pid == inst.pid else None
            if current is not None and current.duration_s is not None:
                smoke.add_metric(key, current.duration_s)
            smoke_ok.add_metric(
                key, _bool(current is not None and current.status is SmokeStatus.PASSED)
            )
        yield from (pending, running, probe, probe_ok, probe_fail, smoke, smoke_ok)

    def _proxy(self) -> Iterator[Metric]:
        """The authenticating proxy (COMFYUI_EXPOSE=proxy); no series without one."""
        proxy = self._state.proxy
        if proxy is None:
            return
        yield GaugeMetricFamily(
            PREFIX + "proxy_up",
            "1 while the proxy (Caddy) runs and its public ports answer as they must (401 "
            "without the access token); 0 makes every instance not ready",
            value=_bool(proxy.serving),
        )
        yield CounterMetricFamily(
            PREFIX + "proxy_restarts",
            "Restarts of the proxy (Caddy) since the agent started: by supervisord after a "
            "crash, or by the agent after a backoff",
            value=float(proxy.restarts),
        )
        if proxy.started_at is not None:
            yield GaugeMetricFamily(
                PREFIX + "proxy_start_time_seconds",
                "Unix time the current proxy process started",
                value=proxy.started_at,
            )

    def _install(self) -> Iterator[Metric]:
        duration = GaugeMetricFamily(
            PREFIX + "install_step_duration_seconds",
            "How long a finished install step took",
            labels=["step"],
        )
        status = GaugeMetricFamily(
            PREFIX + "install_step_status",
            "An install step's status: 1 for the current one, 0 for the others",
            labels=["step", "status"],
        )
        for step in self._state.install_steps:
            if step.duration_s is not None:
                duration.add_metric([step.name], step.duration_s)
            for s in StepStatus:
                status.add_metric([step.name, s.value], _bool(s is step.status))
        yield duration
        yield status
        failed = GaugeMetricFamily(
            PREFIX + "custom_node_import_failed",
            "1 when a custom node failed to install or to import in ComfyUI, or was skipped "
            "over a requirements conflict",
            labels=["node"],
        )
        for name, node in sorted(self._state.custom_nodes.items()):
            if node.enabled:
                failed.add_metric([name], _bool(node.status in checks.FAILED_NODE_STATES))
        yield failed

    def _models(self) -> Iterator[Metric]:
        verified = GaugeMetricFamily(
            PREFIX + "model_verified",
            "1 when a manifest model is on disk with its size and sha256 checked",
            labels=["model"],
        )
        unverified = GaugeMetricFamily(
            PREFIX + "model_unverified",
            "1 when a manifest model is on disk unchecked: the manifest gives no sha256 or size",
            labels=["model"],
        )
        for name, model in sorted(self._state.models.items()):
            verified.add_metric([name], _bool(model.status == ModelStatus.VERIFIED))
            unverified.add_metric([name], _bool(model.status == ModelStatus.UNVERIFIED))
        yield verified
        yield unverified
        yield GaugeMetricFamily(
            PREFIX + "models_required_missing",
            "Required manifest models not on disk yet (missing, downloading or failed)",
            value=float(
                sum(1 for m in self._state.models.values() if m.required and not m.present)
            ),
        )
        yield CounterMetricFamily(
            PREFIX + "download_bytes",
            "Model bytes downloaded since the agent started",
            value=float(self._state.download_bytes_total),
        )

    def _gpu_rows(self, instances: list[InstanceState]) -> list[_GpuRow]:
        """GPUs NVML knows of, then planned GPUs it has not reported (their PCI id unknown)."""
        rows = [
            _GpuRow(
                (str(g.index), g.uuid, g.pci_bus_id, f"nvidia{g.index}", g.name, self._hostname),
                str(g.index),
                g.uuid,
                g,
            )
            for _, g in sorted(self._state.gpus.items())
        ]
        known = {row.uuid for row in rows}
        for inst in instances:
            plan = inst.plan
            if plan.gpu_uuid not in known:
                gpu = str(plan.gpu)
                labels = (gpu, plan.gpu_uuid, "", f"nvidia{gpu}", plan.gpu_name, self._hostname)
                rows.append(_GpuRow(labels, gpu, plan.gpu_uuid, None))
                known.add(plan.gpu_uuid)
        return rows

    def _gpus(self, instances: list[InstanceState]) -> Iterator[Metric]:
        rows = self._gpu_rows(instances)
        quarantined = GaugeMetricFamily(
            PREFIX + "gpu_quarantined",
            "1 when the GPU is taken out of service (its instance stopped and not restarted)",
            labels=["gpu", "uuid"],
        )
        for row in rows:
            flag = row.status is not None and row.status.quarantined
            quarantined.add_metric([row.index, row.uuid], _bool(flag))
        yield quarantined
        # CPU slots (CPU mode) are not GPUs: no Xid counters and no NVML gauges for them.
        real = [row for row in rows if not row.uuid.startswith("cpu-")]
        xid = CounterMetricFamily(
            PREFIX + "gpu_xid_errors",
            "Xid events per GPU and Xid code since the agent started "
            "(DCGM_FI_DEV_XID_ERRORS only keeps the last code)",
            labels=[*DCGM_LABELS, "xid"],
        )
        for row in real:
            counts = row.status.xid_counts if row.status is not None else {}
            for code in sorted({*XID_CODES_AT_ZERO, *counts}):
                xid.add_metric([*row.labels, str(code)], float(counts.get(code, 0)))
        yield xid
        yield from _nvml_families([r for r in real if r.status and r.status.sampled_at is not None])


# (name, help, GpuStatus attribute, counter?) for the NVML quantities dcgm-exporter users chart.
NVML_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("gpu_temperature_celsius", "GPU core temperature", "temperature_celsius", False),
    ("gpu_power_watts", "Power draw", "power_watts", False),
    ("gpu_utilization_ratio", "Time a kernel ran, 0-1", "utilization_ratio", False),
    (
        "gpu_memory_utilization_ratio",
        "Time memory was read or written, 0-1",
        "memory_utilization_ratio",
        False,
    ),
    ("gpu_framebuffer_used_bytes", "Framebuffer memory used", "memory_used_bytes", False),
    ("gpu_framebuffer_free_bytes", "Framebuffer memory free", "memory_free_bytes", False),
    ("gpu_framebuffer_total_bytes", "Framebuffer memory in total", "memory_total_bytes", False),
    (
        "gpu_ecc_corrected_errors",
        "Corrected (single-bit) ECC errors since the driver loaded",
        "ecc_corrected_total",
        True,
    ),
    (
        "gpu_ecc_uncorrected_errors",
        "Uncorrected (double-bit) ECC errors since the driver loaded",
        "ecc_uncorrected_total",
        True,
    ),
    (
        "gpu_remapped_rows_correctable",
        "Rows remapped for correctable errors",
        "remapped_rows_correctable",
        True,
    ),
    (
        "gpu_remapped_rows_uncorrectable",
        "Rows remapped for uncorrectable errors",
        "remapped_rows_uncorrectable",
        True,
    ),
    (
        "gpu_row_remap_pending",
        "1 while a row remap waits for a GPU reset",
        "row_remap_pending",
        False,
    ),
    (
        "gpu_row_remap_failed",
        "1 when a row remap failed (the GPU needs service)",
        "row_remap_failed",
        False,
    ),
    (
        "gpu_retired_pages_pending",
        "1 while a page retirement waits for a reset (pre-Ampere)",
        "retired_pages_pending",
        False,
    ),
    ("gpu_last_sample_timestamp_seconds", "Unix time of the last NVML sample", "sampled_at", False),
)


def _nvml_families(rows: list[_GpuRow]) -> Iterator[Metric]:
    for name, doc, attr, counter in NVML_FIELDS:
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(PREFIX + name, doc, labels=DCGM_LABELS)
            if counter
            else GaugeMetricFamily(PREFIX + name, doc, labels=DCGM_LABELS)
        )
        for row in rows:
            value = getattr(row.status, attr)
            if value is not None:
                family.add_metric(list(row.labels), float(value))
        yield family


class Snapshot(Collector):
    """Families built earlier (on the event loop, which owns the state) to be encoded later,
    elsewhere (in a thread), without touching the state again."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """The families given at construction."""
        return iter(self._families)


def process_collectors() -> list[Collector]:
    """The agent's own process, platform and GC collectors, registered nowhere yet."""
    # They register themselves on construction (GCCollector insists on a registry): give
    # them a scratch one, never the global one.
    scratch = CollectorRegistry(auto_describe=False)
    return [
        ProcessCollector(registry=scratch),
        PlatformCollector(registry=scratch),
        GCCollector(registry=scratch),
    ]


def registry_of(*collectors: Collector) -> CollectorRegistry:
    """A registry of our own (never the global one) holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


def build_registry(state: MachineState, process: bool = True) -> CollectorRegistry:
    """A live registry reading ``state`` at every collect, plus the agent's process, platform
    and GC collectors unless ``process`` is False. Collect it where the state lives."""
    return registry_of(MachineCollector(state), *(process_collectors() if process else []))
