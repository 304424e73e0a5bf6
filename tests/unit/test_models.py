"""Models, pure parts: manifest validation, the plan's yaml flag, workflow parsing, health."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from config.errors import ConfigError
from config.models import ModelEntry, build_model_specs
from config.settings import load_settings
from health import checks
from health.metrics import MachineCollector
from machine.standin.comfyui import model_paths
from services.gpu.interface import cpu_slots
from services.models.extra_paths import render_extra_model_paths
from services.models.fetcher import register_models
from services.models.instance_check import combo_choices
from services.models.paths import destination
from services.models.workflows import WorkflowError, WorkflowRef, parse_workflow
from services.plan import make_plan
from services.state import MachineState, ModelState
from tests.unit.test_checks import NOW, instance, make_ready, node

SHA = "a" * 64


def toml_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "machine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings({"MACHINE_CONFIG": str(path)})
    return [str(p) for p in info.value.problems]


def test_manifest_defaults_and_filename_from_url() -> None:
    (spec,), problems = build_model_specs(
        [
            ModelEntry(
                url="https://h.example/r/resolve/main/flux%201.safetensors?download=1",
                folder="diffusion_models",
                sha256=SHA.upper(),
            )
        ]
    )
    assert not problems
    assert (
        spec.filename == "flux 1.safetensors" and spec.name == "diffusion_models/flux 1.safetensors"
    )
    assert spec.required and spec.when == "before_start" and spec.sha256 == SHA


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'url = "https://h/x.bin"\nfolder = "vae"\nfilename = "../../etc/x"',
            "models[0].filename (in",
        ),
        (
            'url = "https://h/x.bin"\nfolder = "vae"\nfilename = "/etc/passwd"',
            "must be a relative path",
        ),
        ('url = "ftp://h/x.bin"\nfolder = "vae"', "scheme must be http, https or file"),
        ('url = "https://h/x.bin"\nfolder = "../vae"', "models[0].folder"),
        ('url = "https://h/x.bin"\nfolder = "vae"\nsha256 = "abc"', "64 hexadecimal"),
        ('url = "https://h/x.bin"\nfolder = "vae"\nauth_env = "hf_token value"', "NAME of an"),
        ('url = "https://h/x.bin"\nfolder = "vae"\nwhen = "later"', "models[0].when"),
        ('url = "https://h/x.bin"\nfolder = "vae"\nsize = -1', "models[0].size"),
    ],
)
def test_bad_manifest_entries_are_named(tmp_path: Path, line: str, expected: str) -> None:
    lines = toml_problems(tmp_path, f"[[models]]\n{line}\n")
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("models[0]")


def test_duplicate_destination(tmp_path: Path) -> None:
    entry = '[[models]]\nurl = "https://h/x.bin"\nfolder = "vae"\n'
    (line,) = toml_problems(tmp_path, entry + entry)
    assert line.startswith("models[1].filename") and "also the destination of models[0]" in line


def test_extra_model_paths_flag_is_plan_owned() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_ARGS": "--extra-model-paths-config /x.yaml"})
    assert "COMFYUI_MODELS_PATH" in str(info.value)


def test_workflows_relative_to_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "machine.toml"
    path.write_text('workflows = ["flows/a.json"]\n')
    assert load_settings({"MACHINE_CONFIG": str(path)}).workflows == [tmp_path / "flows/a.json"]


def test_plan_passes_the_yaml_that_maps_the_store(tmp_path: Path) -> None:
    settings = load_settings(
        {"MACHINE_WORKSPACE": str(tmp_path), "NUM_GPUS": "2", "COMFYUI_CPU_ONLY": "true"}
    )
    plan = make_plan(settings, cpu_slots(2))
    for inst in plan.instances:
        argv = list(inst.argv)
        assert argv[argv.index("--extra-model-paths-config") + 1] == str(plan.extra_model_paths)
    assert plan.extra_model_paths == tmp_path / "run" / "extra_model_paths.yaml"
    # The stand-in (ComfyUI's loader) reads the yaml: one store, every folder type.
    store = tmp_path / "models"
    for rel in (
        "checkpoints/a.safetensors",
        "unet/u.safetensors",
        "clip/c.sft",
        "diffusion_models/sub/d.safetensors",
    ):
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(b"x")
    yaml_file = tmp_path / "extra.yaml"
    yaml_file.write_text(render_extra_model_paths(store, ["my_custom_folder"]))
    model_paths.init(str(tmp_path / "ComfyUI"))
    model_paths.load_extra_path_config(str(yaml_file))
    assert model_paths.get_filename_list("checkpoints") == ["a.safetensors"]
    assert model_paths.get_filename_list("diffusion_models") == [
        "sub/d.safetensors",
        "u.safetensors",
    ]
    assert model_paths.get_filename_list("unet") == ["sub/d.safetensors", "u.safetensors"]
    assert model_paths.get_filename_list("text_encoders") == ["c.sft"]
    assert model_paths.get_folder_paths("my_custom_folder") == [str(store / "my_custom_folder")]


def test_destination_refuses_a_symlink_out(tmp_path: Path) -> None:
    (spec,), _ = build_model_specs([ModelEntry(url="https://h/x.bin", folder="vae")])
    (tmp_path / "store").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store" / "vae").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match=r"models\[0\] \(vae/x.bin\).*outside"):
        destination(tmp_path / "store", spec)


def test_workflow_references() -> None:
    flow = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "6": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "dir/f.GGUF"}},
    }
    refs = parse_workflow("w.json", {"prompt": flow})
    assert refs == [
        WorkflowRef("w.json", "4", "CheckpointLoaderSimple", "ckpt_name", "sd.safetensors"),
        WorkflowRef("w.json", "6", "UnetLoaderGGUF", "unet_name", "dir/f.GGUF"),
    ]
    with pytest.raises(WorkflowError, match="UI format"):
        parse_workflow("ui.json", {"nodes": [], "links": []})


def test_combo_choices_old_and_new_style() -> None:
    info = {
        "input": {
            "required": {"ckpt_name": [["a.safetensors"], {}], "seed": ["INT", {}]},
            "optional": {"x": ["COMBO", {"options": ["b.gguf"]}]},
        }
    }
    assert combo_choices(info, "ckpt_name") == ["a.safetensors"]
    assert combo_choices(info, "x") == ["b.gguf"]
    assert combo_choices(info, "seed") is None and combo_choices(info, "nope") is None


def _state_with(*models: ModelState) -> MachineState:
    state = node(make_ready(instance(0)))
    state.models = {m.name: m for m in models}
    state.models_configured = True
    return state


def _model(name: str, status: str, required: bool = True, **kw: object) -> ModelState:
    folder, filename = name.split("/")
    return ModelState(
        name=name,
        folder=folder,
        filename=filename,
        url="https://h/" + filename,
        path="/m/" + name,
        required=required,
        when="before_start",
        size=None,
        sha256=None,
        status=status,
        **kw,
    )  # type: ignore[arg-type]


def test_models_report_statuses() -> None:
    ok = _model("vae/a.safetensors", "verified", bytes_done=10, bytes_total=10)
    code, body = checks.models_report(_state_with(ok), NOW)
    assert code == 200 and body["status"] == "ready" and body["models"][0]["status"] == "verified"
    downloading = _model(
        "checkpoints/b.safetensors",
        "downloading",
        bytes_done=50 * 2**20,
        bytes_total=200 * 2**20,
        session_bytes=50 * 2**20,
        started_at=NOW - 5,
    )
    code, body = checks.models_report(_state_with(ok, downloading), NOW)
    assert code == 503 and body["status"] == "starting"
    entry = body["models"][1]
    assert entry["rate_bytes_per_s"] == 10 * 2**20 and entry["eta_s"] == 15.0
    assert "50 of 200 MiB (25%)" in body["reasons"][0]
    assert body["progress"]["bytes_total"] == 200 * 2**20 + 10
    failed = _model("loras/c.safetensors", "failed", error="loras/c.safetensors: HTTP 404")
    code, body = checks.models_report(_state_with(ok, failed), NOW)
    assert code == 503 and body["status"] == "failed" and "HTTP 404" in body["reasons"][0]
    optional = _model("loras/d.safetensors", "failed", required=False, error="boom")
    code, body = checks.models_report(_state_with(ok, optional), NOW)
    assert code == 200 and body["status"] == "degraded"


def test_instance_not_ready_until_checked_and_listing_everything() -> None:
    inst = make_ready(instance(0))
    state = _state_with(_model("vae/a.safetensors", "verified"))
    state.instances = {0: inst}
    inst.model_check_needed = True
    assert not checks.instance_ready(inst)
    assert "being checked" in checks.instance_body(inst, None, NOW)["reasons"][0]
    inst.model_check_pid = inst.pid
    assert checks.instance_ready(inst)
    inst.model_mismatches = ["comfyui-gpu0 does not list 'a.safetensors' under vae"]
    assert not checks.instance_ready(inst)
    assert checks.instance_body(inst, None, NOW)["reasons"] == inst.model_mismatches
    code, body = checks.models_report(state, NOW)
    assert code == 503 and body["instances"][0]["mismatches"] == inst.model_mismatches
    inst.pid = 101  # a new process must be checked again
    inst.model_mismatches = []
    assert not checks.instance_ready(inst)


def test_workflow_refs_in_the_report() -> None:
    inst = make_ready(instance(0))
    state = _state_with()
    state.instances = {0: inst}
    ref = WorkflowRef("w.json", "7", "UNETLoader", "unet_name", "flux.safetensors")
    state.workflow_refs = [ref]
    inst.model_check_needed, inst.model_check_pid = True, inst.pid
    inst.workflow_missing = [ref]
    code, body = checks.models_report(state, NOW)
    assert code == 503
    assert body["workflows"] == [
        {
            **json.loads(json.dumps(body["workflows"][0])),
            "missing_on": ["comfyui-gpu0"],
            "listed_by": [],
        }
    ]
    assert (
        "workflow w.json node 7 (UNETLoader) input unet_name: 'flux.safetensors'"
        in (body["reasons"][0])
    )


def test_metrics_read_the_models() -> None:
    state = MachineState()
    register_models(
        state,
        build_model_specs(
            [
                ModelEntry(url="https://h/a.bin", folder="vae"),
                ModelEntry(url="https://h/b.bin", folder="vae", required=False),
            ]
        )[0],
        Path("/m"),
    )
    state.models["vae/a.bin"].status = "verified"
    state.download_bytes_total = 1234
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MachineCollector(state))
    assert registry.get_sample_value("comfy_machine_model_verified", {"model": "vae/a.bin"}) == 1
    assert registry.get_sample_value("comfy_machine_model_verified", {"model": "vae/b.bin"}) == 0
    assert registry.get_sample_value("comfy_machine_models_required_missing") == 0
    assert registry.get_sample_value("comfy_machine_download_bytes_total") == 1234


def test_terminal_progress_line() -> None:
    from machine.models_cmd import progress_line

    state = MachineState()
    state.models = {
        "vae/a.bin": _model("vae/a.bin", "verified", bytes_done=2**20, bytes_total=2**20),
        "unet/b.bin": _model(
            "unet/b.bin",
            "downloading",
            bytes_done=3 * 2**20,
            bytes_total=5 * 2**20,
            session_bytes=3 * 2**20,
            started_at=NOW - 3,
        ),
    }
    line = progress_line(state, NOW)
    assert line == ("models: 1/2 verified, 4.0 MiB of 6.0 MiB, 1.0 MiB/s, ETA 2s - unet/b.bin")
