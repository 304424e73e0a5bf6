"""The NVML interface: the fake (in memory and file-backed), the real adapter without a driver,
and GPU selection (NUM_GPUS, COMFYUI_GPUS)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from config.errors import ConfigError, GpuError
from config.settings import load_settings
from services.gpu.fake import FakeGpu, FakeNvml
from services.gpu.interface import Gpu, Nvml, list_gpus
from services.gpu.nvml import RealNvml, throttle_names
from services.plan import make_plan


def fake(count: int = 2) -> FakeNvml:
    return FakeNvml([FakeGpu(uuid=f"GPU-{i}") for i in range(count)])


def test_fake_inventory_and_sample() -> None:
    nvml = fake()
    # `gpu` in names, ports and health paths is the index: NVML's order, numbered from 0.
    gpus = list_gpus(nvml)
    assert [(g.index, g.uuid, g.name) for g in gpus] == [
        (0, "GPU-0", "NVIDIA GeForce RTX 4090"),
        (1, "GPU-1", "NVIDIA GeForce RTX 4090"),
    ]
    assert gpus[0].memory_total_bytes == 24 * 2**30 and not gpus[0].is_cpu
    assert not nvml.is_open  # list_gpus closes again
    inventory = nvml.open()
    assert inventory.driver_version == "550.54.15" and inventory.cuda_version == "12.4"
    assert inventory.devices[1].pci_bus_id == "00000000:02:00.0"
    sample = nvml.sample(0)
    assert sample.lost is None and sample.temperature_celsius == 40.0
    assert sample.memory_free_bytes == sample.memory_total_bytes - sample.memory_used_bytes


def test_fake_faults() -> None:
    nvml = fake()
    nvml.inject_xid(0, 31)  # raised before open: an event set never sees it
    nvml.open()
    assert nvml.xid_events() == []
    nvml.inject_xid(1, 79)
    nvml.inject_xid(1, 48)
    assert [(e.uuid, e.code) for e in nvml.xid_events()] == [("GPU-1", 79), ("GPU-1", 48)]
    assert nvml.xid_events() == []  # each event once
    nvml.inject_ecc(0, 2)
    nvml.heat(0, 99.0)
    nvml.lose(1)
    assert nvml.sample(0).ecc_uncorrected_total == 2
    assert nvml.sample(0).temperature_celsius == 99.0
    assert nvml.sample(1).lost == "NVML: GPU is lost"


def test_fake_from_file_rereads_it(tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    gpus = [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")]
    FakeNvml.write(path, gpus, driver_version="535.1")
    nvml = FakeNvml.from_file(path)
    assert nvml.open().driver_version == "535.1"
    gpus[1].xids.append(94)
    gpus[0].lost = True
    FakeNvml.write(path, gpus, driver_version="535.1")
    assert [e.code for e in nvml.xid_events()] == [94]
    assert nvml.sample(0).lost
    FakeNvml.write(path, gpus, no_driver=True)
    with pytest.raises(GpuError, match="COMFYUI_CPU_ONLY=true"):
        list_gpus(nvml)


def test_sampling_needs_open() -> None:
    with pytest.raises(GpuError, match="not open"):
        fake().sample(0)
    with pytest.raises(GpuError, match="not open"):
        RealNvml().sample(0)
    assert RealNvml().xid_events() == []
    RealNvml().close()  # closing what never opened is fine


def _nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    _nvml_available(),
    reason="an NVIDIA driver is present, so its absence cannot be tested: runs on a machine "
    "without one",
)
def test_real_adapter_without_driver_names_the_fix() -> None:
    for call in (RealNvml().open, lambda: list_gpus(RealNvml())):
        with pytest.raises(GpuError) as info:
            call()
        assert "nvmlInit failed" in str(info.value) and "COMFYUI_CPU_ONLY=true" in str(info.value)


@pytest.mark.skipif(
    not _nvml_available(),
    reason="no NVIDIA driver (NVML) here: run on a host with an NVIDIA GPU and its driver "
    "(in Docker: --gpus all)",
)
def test_real_adapter_on_a_gpu() -> None:
    nvml = RealNvml()
    inventory = nvml.open()
    try:
        assert inventory.devices and inventory.devices[0].uuid.startswith(("GPU-", "MIG-"))
        sample = nvml.sample(0)
        assert sample.lost is None and sample.memory_total_bytes
        nvml.xid_events()
    finally:
        nvml.close()
    # The plan's inventory comes from the same adapter: every GPU, NVML index order.
    gpus = list_gpus(RealNvml())
    assert [(g.index, g.uuid) for g in gpus] == [(d.index, d.uuid) for d in inventory.devices]
    assert [g.index for g in gpus] == list(range(len(gpus)))


def test_throttle_names() -> None:
    assert throttle_names(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")


GPUS = [Gpu(i, f"GPU-{i}aaa", "NVIDIA H100", 80 << 30, f"0000:0{i}:00.0") for i in range(4)]


def plan_for(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return make_plan(load_settings({"MACHINE_WORKSPACE": "/ws", **env}), GPUS, "/agent/python")


def test_comfyui_gpus_picks_indices_and_uuids_in_order() -> None:
    plan = plan_for({"COMFYUI_GPUS": "3, GPU-1aaa"})
    assert [i.gpu_uuid for i in plan.instances] == ["GPU-3aaa", "GPU-1aaa"]
    assert [i.env["CUDA_VISIBLE_DEVICES"] for i in plan.instances] == ["GPU-3aaa", "GPU-1aaa"]
    # ``gpu`` is the NVML index: names, ports and log files follow it, in the order given.
    assert [i.gpu for i in plan.instances] == [3, 1]
    assert [i.name for i in plan.instances] == ["comfyui-gpu3", "comfyui-gpu1"]
    assert [i.port for i in plan.instances] == [8191, 8189]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"COMFYUI_GPUS": "7"}, "'7' is not a GPU found here (0: GPU-0aaa (NVIDIA H100)"),
        ({"COMFYUI_GPUS": "GPU-nope"}, "'GPU-nope' is not a GPU found here"),
        ({"COMFYUI_GPUS": "1,GPU-1aaa"}, "'GPU-1aaa' is listed twice"),
        ({"COMFYUI_GPUS": "0,1", "NUM_GPUS": "3"}, "names 2 GPU(s) but NUM_GPUS=3"),
    ],
)
def test_comfyui_gpus_errors(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_for(env)
    assert str(info.value).startswith("COMFYUI_GPUS=") and words in str(info.value)


def test_cpu_mode_ignores_comfyui_gpus() -> None:
    plan = plan_for({"COMFYUI_CPU_ONLY": "true", "COMFYUI_GPUS": "9"})
    assert [i.gpu_uuid for i in plan.instances] == ["cpu-0"]


def test_real_and_fake_implement_the_one_interface() -> None:
    methods = {name for name in vars(Nvml) if not name.startswith("_")}
    assert methods == {"open", "sample", "xid_events", "close"}
    real = {name for name in vars(RealNvml) if not name.startswith("_")}
    assert real == methods  # the real adapter is nothing but the interface
    for cls in (RealNvml, FakeNvml):
        for name in methods:
            got = inspect.signature(getattr(cls, name))
            assert got == inspect.signature(getattr(Nvml, name)), (cls, name)
