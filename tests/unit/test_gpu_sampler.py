"""The sampler over the fake NVML: MachineState.gpus filled, Xids counted, quarantine called."""

from __future__ import annotations

from services.gpu.fake import FakeGpu, FakeNvml
from services.gpu.policy import GpuPolicy
from services.gpu.sampler import GpuSampler
from services.state import MachineState


async def test_sampler_fills_state_and_quarantines_once() -> None:
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")])
    state = MachineState()
    calls: list[tuple[str, str]] = []

    async def quarantine(uuid: str, reason: str) -> None:
        calls.append((uuid, reason))

    sampler = GpuSampler(nvml, state, GpuPolicy(), 0.1, quarantine)
    await sampler.open()
    assert [g.uuid for g in state.gpus.values()] == ["GPU-a", "GPU-b"]
    assert state.gpus[0].driver_version == "550.54.15"
    await sampler.cycle()
    a, b = state.gpus[0], state.gpus[1]
    assert a.sampled_at is not None and a.temperature_celsius == 40.0 and not a.quarantined
    # What health and /metrics show: the memory figures of the sample, per GPU.
    assert (a.memory_used_bytes, a.memory_total_bytes) == (512 * 2**20, 24 * 2**30)
    assert a.memory_free_bytes == a.memory_total_bytes - a.memory_used_bytes

    nvml.inject_xid(1, 95)
    nvml.inject_xid(1, 95)
    nvml.inject_xid(0, 13)
    await sampler.cycle()
    assert b.xid_counts == {95: 2} and a.xid_counts == {13: 1}
    assert b.quarantined and b.quarantine_reason and "Xid 95" in b.quarantine_reason
    assert not a.quarantined and "Xid 13" in a.warnings[0]
    assert calls == [("GPU-b", f"GPU 1 (GPU-b) quarantined: {b.quarantine_reason}")]

    # A GPU that stops answering may be a passing moment: quarantined on the third sample in
    # a row (GPU_UNHEALTHY_SAMPLES), once.
    nvml.lose(0)
    await sampler.cycle()
    await sampler.cycle()
    assert not a.quarantined and a.unhealthy_samples == 2
    assert "unhealthy sample 2 of 3" in a.warnings[-1]
    await sampler.cycle()
    await sampler.cycle()
    assert a.lost and a.temperature_celsius == 40.0  # last good readings stay
    assert [uuid for uuid, _ in calls] == ["GPU-b", "GPU-a"]  # once per GPU


async def test_one_hot_sample_does_not_quarantine_three_in_a_row_do() -> None:
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")])
    state = MachineState()
    calls: list[str] = []

    async def quarantine(uuid: str, reason: str) -> None:
        calls.append(reason)

    sampler = GpuSampler(nvml, state, GpuPolicy(unhealthy_samples=3), 0.1, quarantine)
    await sampler.open()
    a = state.gpus[0]
    for hot in (True, True, False, True, True):  # a cool sample in between starts over
        nvml.heat(0, 97.0 if hot else 60.0)
        await sampler.cycle()
    assert calls == [] and not a.quarantined and a.unhealthy_samples == 2
    await sampler.cycle()
    assert a.quarantined and len(calls) == 1 and "temperature 97 °C" in calls[0]
    # A fatal Xid or an uncorrected ECC error acts on the first sample.
    nvml.inject_ecc(1)
    await sampler.cycle()
    assert state.gpus[1].quarantined and len(calls) == 2 and "uncorrected ECC" in calls[1]
