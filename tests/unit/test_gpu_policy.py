"""The GPU health policy: Xid classes from NVIDIA's catalogue, thresholds, verdicts."""

from __future__ import annotations

import pytest

from config.settings import load_settings
from services.gpu.guard import policy_from
from services.gpu.interface import GpuSample
from services.gpu.policy import GpuPolicy, Verdict, XidClass, classify_xid, debounce, evaluate

OK = GpuSample(at=0.0, temperature_celsius=50.0, ecc_uncorrected_total=0)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        *((c, XidClass.APPLICATION) for c in (13, 31, 43, 45, 68)),
        *((c, XidClass.MEMORY) for c in (48, 63, 64, 94, 95)),
        (79, XidClass.BUS),
        *((c, XidClass.FAULT) for c in (61, 62, 74, 92, 119, 120, 999)),
    ],
)
def test_xid_classes(code: int, kind: XidClass) -> None:
    assert classify_xid(code) is kind


def test_a_healthy_gpu() -> None:
    assert evaluate(OK, [], GpuPolicy()).healthy


def test_application_xids_warn_and_faults_quarantine() -> None:
    verdict = evaluate(OK, [13, 43], GpuPolicy())
    assert verdict.healthy and "Xid 13" in verdict.warnings[0]
    verdict = evaluate(OK, [48], GpuPolicy())
    assert not verdict.healthy
    assert verdict.reason is not None and verdict.reason.startswith(
        "Xid 48 (double-bit ECC error): memory error; drain the host and reset the GPU"
    )


def test_thresholds_each_give_a_reason() -> None:
    policy = GpuPolicy()
    cases = {
        "stopped answering NVML": GpuSample(at=0, lost="NVML: GPU is lost"),
        "2 uncorrected ECC": GpuSample(at=0, ecc_uncorrected_total=2),
        "row remapping failed": GpuSample(at=0, row_remap_failed=True),
        "temperature 95 °C is above GPU_MAX_TEMPERATURE_CELSIUS=90": GpuSample(
            at=0, temperature_celsius=95.0
        ),
    }
    for words, sample in cases.items():
        verdict = evaluate(sample, [], policy)
        assert not verdict.healthy and verdict.reason and words in verdict.reason


def test_pending_retirement_and_hardware_throttling_are_warnings() -> None:
    sample = GpuSample(at=0, retired_pages_pending=True, throttle_reasons=("hw_slowdown",))
    verdict = evaluate(sample, [], GpuPolicy())
    assert verdict.healthy and len(verdict.warnings) == 2


def test_policy_from_settings() -> None:
    settings = load_settings(
        {
            "GPU_MAX_TEMPERATURE_CELSIUS": "80",
            "GPU_MAX_ECC_UNCORRECTED": "1",
            "GPU_IGNORED_XIDS": "13, 31, 74",
        }
    )
    policy = policy_from(settings)
    assert policy == GpuPolicy(80.0, 1, (13, 31, 74))
    assert evaluate(OK, [74], policy).healthy
    assert not evaluate(GpuSample(at=0, temperature_celsius=81.0), [], policy).healthy


def test_faults_of_record_act_at_once_passing_readings_when_they_last() -> None:
    policy = GpuPolicy(unhealthy_samples=3)
    immediate = {
        "fatal Xid": evaluate(OK, [79], policy),
        "uncorrected ECC": evaluate(GpuSample(at=0, ecc_uncorrected_total=1), [], policy),
        "row remap failed": evaluate(GpuSample(at=0, row_remap_failed=True), [], policy),
    }
    for what, verdict in immediate.items():
        assert not verdict.healthy and verdict.immediate, what
        assert debounce(verdict, 0, policy) == (1, True), what
    hot = evaluate(GpuSample(at=0, temperature_celsius=95.0), [], policy)
    lost = evaluate(GpuSample(at=0, lost="NVML: timeout"), [], policy)
    for verdict in (hot, lost):
        assert not verdict.healthy and not verdict.immediate
        assert debounce(verdict, 0, policy) == (1, False)
        assert debounce(verdict, 1, policy) == (2, False)
        assert debounce(verdict, 2, policy) == (3, True)
    # A healthy sample starts the count again; with 1 the first unhealthy sample acts.
    assert debounce(Verdict(True), 2, policy) == (0, False)
    assert debounce(hot, 0, GpuPolicy(unhealthy_samples=1)) == (1, True)
    # A hot sample with a fatal Xid is a fault of record: at once.
    both = evaluate(GpuSample(at=0, temperature_celsius=95.0), [48], policy)
    assert both.immediate and "Xid 48" in (both.reason or "") and "95 °C" in (both.reason or "")
