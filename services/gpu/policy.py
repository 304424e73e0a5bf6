"""The GPU health policy: pure functions from an NVML sample and Xid events to a verdict.

Xid classes follow NVIDIA's Xid catalogue (docs.nvidia.com/deploy/xid-errors) and the
Kubernetes device plugin, which treats 13, 31, 43, 45 and 68 as application errors (a bad
kernel, a killed or faulting process: the GPU is fine) and every other Xid as a GPU fault.

A fault of the hardware's record (a fatal Xid, uncorrected ECC errors, a failed row remap)
quarantines at once; a reading that can be a passing moment (a hot sample, a GPU that did not
answer one sample) only after ``unhealthy_samples`` unhealthy samples in a row (``debounce``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from services.gpu.interface import GpuSample


class XidClass(StrEnum):
    APPLICATION = "application error"
    MEMORY = "memory error"
    BUS = "fell off the bus"
    FAULT = "GPU fault"


# Application errors: the Kubernetes device plugin's default skip list.
APPLICATION_XIDS = (13, 31, 43, 45, 68)
MEMORY_XIDS = (48, 63, 64, 94, 95)
BUS_XIDS = (79,)
# The catalogue's words for the codes met most on rented hosts (any other code is a fault too).
XID_CATALOGUE: dict[int, str] = {
    13: "graphics engine exception (an application's kernel faulted)",
    31: "GPU memory page fault (an application's illegal address)",
    43: "GPU stopped processing (a user application fault)",
    45: "preemptive cleanup, due to a previous error (a process was killed)",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    68: "video processor exception (NVDEC/NVENC)",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
# Counters that exist at 0 from the start in /metrics (other codes appear when first seen).
XID_CODES_AT_ZERO = tuple(sorted(XID_CATALOGUE))


def classify_xid(code: int, application: tuple[int, ...] = APPLICATION_XIDS) -> XidClass:
    if code in application:
        return XidClass.APPLICATION
    if code in MEMORY_XIDS:
        return XidClass.MEMORY
    if code in BUS_XIDS:
        return XidClass.BUS
    return XidClass.FAULT


def describe_xid(code: int) -> str:
    words = XID_CATALOGUE.get(code)
    return f"Xid {code} ({words})" if words else f"Xid {code}"


@dataclass(frozen=True)
class GpuPolicy:
    """When a GPU is taken out of service. Settings build it (GPU_* variables)."""

    max_temperature_celsius: float = 90.0
    max_ecc_uncorrected: int = 0  # volatile uncorrected ECC errors tolerated
    ignored_xids: tuple[int, ...] = APPLICATION_XIDS
    quarantine_on_row_remap_failure: bool = True
    quarantine_on_retired_pages_pending: bool = False  # needs a reset, the GPU still works
    unhealthy_samples: int = 3  # hot or unanswered samples in a row that quarantine


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str | None = None  # why it is unhealthy, in words an operator acts on
    warnings: tuple[str, ...] = ()
    # A fault that quarantines at once (fatal Xid, uncorrected ECC, failed row remap); else
    # only GPU_UNHEALTHY_SAMPLES unhealthy samples in a row do.
    immediate: bool = False


RESET_HINT = "drain the host and reset the GPU (nvidia-smi -r) or reboot; if it recurs, replace it"


def evaluate(sample: GpuSample, new_xids: list[int], policy: GpuPolicy) -> Verdict:
    """The verdict on one GPU from its latest sample and the Xid events since the last one."""
    problems: list[str] = []  # faults that act at once
    passing: list[str] = []  # readings that may pass: they act when they last
    warnings: list[str] = []
    if sample.lost:
        passing.append(f"the GPU stopped answering NVML ({sample.lost}); {RESET_HINT}")
    for code in dict.fromkeys(new_xids):
        kind = classify_xid(code, policy.ignored_xids)
        if kind is XidClass.APPLICATION:
            warnings.append(f"{describe_xid(code)}: {kind.value}, the GPU stays in service")
        else:
            problems.append(f"{describe_xid(code)}: {kind.value}; {RESET_HINT}")
    unc = sample.ecc_uncorrected_total
    if unc is not None and unc > policy.max_ecc_uncorrected:
        problems.append(
            f"{unc} uncorrected ECC error(s) since the driver loaded (limit "
            f"{policy.max_ecc_uncorrected}, GPU_MAX_ECC_UNCORRECTED); {RESET_HINT}"
        )
    if sample.row_remap_failed and policy.quarantine_on_row_remap_failure:
        problems.append(f"row remapping failed (no spare rows left); {RESET_HINT}")
    if sample.retired_pages_pending or sample.row_remap_pending:
        what = "pending page retirement" if sample.retired_pages_pending else "pending row remap"
        text = f"{what}: takes effect at the next GPU reset"
        if sample.retired_pages_pending and policy.quarantine_on_retired_pages_pending:
            problems.append(f"{text}; {RESET_HINT}")
        else:
            warnings.append(text)
    temp = sample.temperature_celsius
    if temp is not None and temp > policy.max_temperature_celsius:
        passing.append(
            f"temperature {temp:.0f} °C is above GPU_MAX_TEMPERATURE_CELSIUS="
            f"{policy.max_temperature_celsius:.0f}; check the host's cooling"
        )
    hardware = [r for r in sample.throttle_reasons if r.startswith("hw_")]
    if hardware:
        warnings.append(f"clocks held down by the hardware: {', '.join(hardware)}")
    if problems or passing:
        return Verdict(False, "; ".join(problems + passing), tuple(warnings), bool(problems))
    return Verdict(True, None, tuple(warnings))


def debounce(verdict: Verdict, streak: int, policy: GpuPolicy) -> tuple[int, bool]:
    """(unhealthy samples in a row including this one, quarantine now?): a fault of record
    acts at once, a passing reading once it was seen ``policy.unhealthy_samples`` times in a
    row; a healthy sample starts the count again."""
    if verdict.healthy:
        return 0, False
    streak += 1
    return streak, verdict.immediate or streak >= policy.unhealthy_samples
