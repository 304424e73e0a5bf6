"""The plan: a pure function of settings and GPUs; and the supervisord conf rendered from it."""

import configparser
import shlex
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import load_settings
from services.gpu.interface import Gpu
from services.plan import make_plan
from services.supervisor.conf import render_conf

GPUS = [Gpu(i, f"GPU-{i}aaa", "NVIDIA H100", 80 << 30, f"0000:0{i}:00.0") for i in range(4)]


def plan_for(env: dict[str, str], gpus: list[Gpu] = GPUS):  # type: ignore[no-untyped-def]
    return make_plan(load_settings({"MACHINE_WORKSPACE": "/ws", **env}), gpus, "/agent/python")


def test_one_instance_per_gpu_bound_by_uuid() -> None:
    plan = plan_for({"NUM_GPUS": "2", "COMFYUI_ARGS": "--preview-method auto"})
    assert [i.name for i in plan.instances] == ["comfyui-gpu0", "comfyui-gpu1"]
    assert [i.port for i in plan.instances] == [8188, 8189]
    second = plan.instances[1]
    assert second.env["CUDA_VISIBLE_DEVICES"] == "GPU-1aaa"
    assert second.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert second.url == "http://127.0.0.1:8189"
    argv = list(second.argv)
    assert argv[argv.index("--port") + 1] == "8189"
    assert argv[argv.index("--listen") + 1] == "127.0.0.1"
    assert argv[argv.index("--output-directory") + 1] == "/ws/output"
    assert argv[argv.index("--input-directory") + 1] == "/ws/input"
    assert argv[-2:] == ["--preview-method", "auto"]
    assert "--cpu" not in argv
    assert second.log_path == Path("/ws/logs/comfyui-gpu1.log")


def test_all_gpus_when_num_gpus_unset() -> None:
    assert len(plan_for({}).instances) == 4


def test_more_gpus_asked_than_found() -> None:
    with pytest.raises(ConfigError) as info:
        plan_for({"NUM_GPUS": "8"})
    (problem,) = info.value.problems
    assert str(problem).startswith("NUM_GPUS=8: only 4 GPU(s) found (0: NVIDIA H100")


def test_no_gpu_found_points_to_cpu_mode() -> None:
    with pytest.raises(ConfigError, match="COMFYUI_CPU_ONLY=true"):
        plan_for({}, gpus=[])


def test_cpu_mode_never_needs_gpus_and_adds_cpu_flag() -> None:
    plan = plan_for({"COMFYUI_CPU_ONLY": "true", "NUM_GPUS": "3"}, gpus=[])
    assert len(plan.instances) == 3
    assert all("--cpu" in i.argv and i.env["CUDA_VISIBLE_DEVICES"] == "" for i in plan.instances)


def test_listen_everywhere_urls_use_loopback() -> None:
    plan = plan_for({"NUM_GPUS": "1", "COMFYUI_LISTEN": "0.0.0.0"})
    assert plan.instances[0].url == "http://127.0.0.1:8188"
    assert "0.0.0.0" in plan.instances[0].argv


def test_port_overlap_with_health_found_with_real_gpu_count() -> None:
    # NUM_GPUS unset: the overlap is only known once the GPUs are counted.
    with pytest.raises(ConfigError, match="MACHINE_HEALTH_PORT=9188"):
        plan_for({"COMFYUI_PORT_START": "9186"})


def test_disabled_comfyui_plans_no_instance() -> None:
    assert plan_for({"ENABLE_COMFYUI": "false"}).instances == ()


def test_workspace_too_long_for_unix_socket() -> None:
    with pytest.raises(ConfigError, match="MACHINE_WORKSPACE"):
        plan_for({"MACHINE_WORKSPACE": "/" + "w" * 120})


def test_conf_programs_and_rpc_socket() -> None:
    plan = plan_for({"NUM_GPUS": "2", "COMFYUI_ARGS": "--x 'a b%c'"})
    parser = configparser.RawConfigParser()
    parser.read_string(render_conf(plan))
    assert parser.get("unix_http_server", "file") == "/ws/run/supervisor.sock"
    assert parser.get("supervisorctl", "serverurl") == "unix:///ws/run/supervisor.sock"
    assert not any(s.startswith("inet_http_server") for s in parser.sections())
    program = dict(parser.items("program:comfyui-gpu1"))
    assert program["autostart"] == "false"  # the agent starts each after its port check
    assert program["stopsignal"] == "INT"
    assert program["stopasgroup"] == program["killasgroup"] == "true"
    # supervisord expands %(x)s: a literal % is doubled, and the command round-trips via shlex.
    assert shlex.split(program["command"].replace("%%", "%"))[-2:] == ["--x", "a b%c"]
    assert 'CUDA_VISIBLE_DEVICES="GPU-1aaa"' in program["environment"]
    listener = dict(parser.items("eventlistener:comfy-machine-events"))
    assert listener["events"] == "PROCESS_STATE"
    assert listener["command"].startswith("/agent/python -m services.supervisor.listener ")


def test_conf_groups_instances_so_they_stop_in_parallel() -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(render_conf(plan_for({"NUM_GPUS": "3"})))
    assert parser.get("group:comfyui", "programs") == "comfyui-gpu0,comfyui-gpu1,comfyui-gpu2"


def test_gpu_is_the_nvml_index_in_names_ports_and_logs() -> None:
    # COMFYUI_GPUS=1,3: GPU i runs comfyui-gpu<i> on 8188 + i; there is no instance 0 or 2.
    plan = plan_for({"COMFYUI_GPUS": "1,3"})
    assert [i.gpu for i in plan.instances] == [1, 3]
    assert [i.name for i in plan.instances] == ["comfyui-gpu1", "comfyui-gpu3"]
    assert [i.port for i in plan.instances] == [8189, 8191]
    assert [i.url for i in plan.instances] == ["http://127.0.0.1:8189", "http://127.0.0.1:8191"]
    assert [i.gpu_uuid for i in plan.instances] == ["GPU-1aaa", "GPU-3aaa"]
    assert [i.log_path.name for i in plan.instances] == ["comfyui-gpu1.log", "comfyui-gpu3.log"]
    third = plan.instance(3)
    assert third is not None and plan.instance(0) is None
    assert third.argv[third.argv.index("--port") + 1] == "8191"
    assert third.env["CUDA_VISIBLE_DEVICES"] == "GPU-3aaa"
    parser = configparser.RawConfigParser()
    parser.read_string(render_conf(plan))
    assert parser.get("group:comfyui", "programs") == "comfyui-gpu1,comfyui-gpu3"
    # NUM_GPUS alone takes the first N GPUs: index and slot agree.
    assert [(i.gpu, i.port) for i in plan_for({"NUM_GPUS": "2"}).instances] == [
        (0, 8188),
        (1, 8189),
    ]


def test_cpu_slots_are_numbered_from_zero() -> None:
    plan = plan_for({"COMFYUI_CPU_ONLY": "true", "NUM_GPUS": "3"}, gpus=[])
    assert [(i.gpu, i.name, i.port) for i in plan.instances] == [
        (0, "comfyui-gpu0", 8188),
        (1, "comfyui-gpu1", 8189),
        (2, "comfyui-gpu2", 8190),
    ]


def test_port_checks_use_the_gpu_indices() -> None:
    # GPUs 0 and 3 from 9186: ports 9186 and 9189, so the health port 9188 is free ...
    plan = plan_for({"COMFYUI_GPUS": "0,GPU-3aaa", "COMFYUI_PORT_START": "9186"})
    assert [i.port for i in plan.instances] == [9186, 9189]
    # ... but GPU 2 from 9186 would take it (found once the UUID is resolved to its index).
    with pytest.raises(ConfigError) as info:
        plan_for({"COMFYUI_GPUS": "GPU-2aaa", "COMFYUI_PORT_START": "9186"})
    assert "instance ports 9188 include MACHINE_HEALTH_PORT=9188" in str(info.value)
    # Indices alone are checked with the settings, before any GPU is looked at.
    with pytest.raises(ConfigError, match="ports 9186, 9188 include MACHINE_HEALTH_PORT"):
        load_settings({"COMFYUI_GPUS": "0,2", "COMFYUI_PORT_START": "9186"})
    with pytest.raises(ConfigError, match=r"need ports 65535, 65537 .*use a start <= 65532"):
        load_settings({"COMFYUI_GPUS": "1,3", "COMFYUI_PORT_START": "65534"})
