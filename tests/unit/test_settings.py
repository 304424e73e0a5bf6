"""Settings: env over TOML, and one clear line per bad input naming source, value and fix."""

import os
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import check_workspace, load_settings


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return [str(p) for p in info.value.problems]


def test_defaults_match_design() -> None:
    s = load_settings({})
    assert s.comfyui_port_start == 8188
    assert s.machine_health_port == 9188
    assert s.comfyui_listen == "127.0.0.1"
    assert s.enable_comfyui and not s.comfyui_cpu_only
    assert s.install_path == Path("/workspace/ComfyUI")
    assert s.models_path == Path("/workspace/models")


def test_num_gpus_not_a_number() -> None:
    (line,) = problems({"NUM_GPUS": "abc"})
    assert line.startswith("NUM_GPUS='abc':")
    assert "valid integer" in line and ">= 1" in line


def test_num_gpus_zero_with_comfyui_enabled() -> None:
    (line,) = problems({"NUM_GPUS": "0"})
    assert line.startswith("NUM_GPUS=0:") and "ENABLE_COMFYUI=false" in line
    assert load_settings({"NUM_GPUS": "0", "ENABLE_COMFYUI": "false"}).num_gpus == 0


def test_port_out_of_range() -> None:
    (line,) = problems({"COMFYUI_PORT_START": "70000"})
    assert line.startswith("COMFYUI_PORT_START='70000':") and "1-65535" in line


def test_instance_ports_overlap_health_port() -> None:
    (line,) = problems({"NUM_GPUS": "4", "COMFYUI_PORT_START": "9186"})
    assert line.startswith("COMFYUI_PORT_START=9186:")
    assert "9186-9189" in line and "MACHINE_HEALTH_PORT=9188" in line


def test_port_range_past_65535() -> None:
    (line,) = problems({"NUM_GPUS": "3", "COMFYUI_PORT_START": "65534"})
    assert "65534-65536" in line and "<= 65533" in line


@pytest.mark.parametrize(
    "args",
    [
        "--port 9000",
        "--listen 0.0.0.0",
        "--lis=0.0.0.0",
        "--cuda-device 1",
        "--output-directory /x",
    ],
)
def test_comfyui_args_cannot_set_plan_owned_flags(args: str) -> None:
    (line,) = problems({"COMFYUI_ARGS": f"--preview-method auto {args}"})
    assert line.startswith("COMFYUI_ARGS=") and "set by comfy-machine's plan" in line


def test_comfyui_args_other_flags_pass() -> None:
    assert load_settings({"COMFYUI_ARGS": "--cpu-vae --preview-method auto"}).comfyui_args


def test_unparseable_comfyui_args() -> None:
    (line,) = problems({"COMFYUI_ARGS": "--foo 'unclosed"})
    assert "cannot be parsed" in line


def test_bad_listen_address() -> None:
    (line,) = problems({"COMFYUI_LISTEN": "everywhere"})
    assert line.startswith("COMFYUI_LISTEN='everywhere':") and "IP address" in line


def test_several_problems_reported_at_once() -> None:
    lines = problems({"NUM_GPUS": "abc", "COMFYUI_PORT_START": "70000", "ENABLE_COMFYUI": "maybe"})
    assert len(lines) == 3


def test_toml_file_env_wins(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text('num_gpus = 3\ncomfyui_args = "--cpu-vae"\n')
    s = load_settings({"MACHINE_CONFIG": str(conf), "NUM_GPUS": "1"})
    assert s.num_gpus == 1  # env wins
    assert s.comfyui_args == "--cpu-vae"  # file fills the rest
    assert s.machine_config == conf


def test_toml_unknown_key_named_with_file_and_suggestion(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text("num_gpu = 2\n")
    (line,) = problems({"MACHINE_CONFIG": str(conf)})
    assert line.startswith(f"num_gpu (in {conf})=2:")
    assert "unknown key" in line and "did you mean 'num_gpus'" in line


def test_toml_bad_value_names_the_key_in_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text('comfyui_port_start = "high"\n')
    (line,) = problems({"MACHINE_CONFIG": str(conf)})
    assert line.startswith(f"comfyui_port_start (in {conf})='high':")


def test_toml_missing_or_broken_file(tmp_path: Path) -> None:
    (line,) = problems({"MACHINE_CONFIG": str(tmp_path / "nope.toml")})
    assert line.startswith("MACHINE_CONFIG=") and "file not found" in line
    broken = tmp_path / "broken.toml"
    broken.write_text("num_gpus = = 2\n")
    (line,) = problems({"MACHINE_CONFIG": str(broken)})
    assert "cannot be read as TOML" in line


def test_empty_env_value_means_unset() -> None:
    assert load_settings({"NUM_GPUS": ""}).num_gpus is None


# Input edge cases (issue 12, point 6): each gets the usual line naming source, value and fix.


def test_relative_workspace_resolved_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="config.settings"):
        s = load_settings({"MACHINE_WORKSPACE": "relative/ws", "COMFYUI_MODELS_PATH": "m"})
    assert s.machine_workspace == tmp_path / "relative" / "ws"
    assert s.install_path == tmp_path / "relative" / "ws" / "ComfyUI"
    assert s.models_path == tmp_path / "m"
    (record,) = [r for r in caplog.records if r.fields["setting"] == "MACHINE_WORKSPACE"]
    assert record.fields == {
        "setting": "MACHINE_WORKSPACE", "given": "relative/ws",
        "resolved": str(tmp_path / "relative" / "ws"),
    }


def test_workspace_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "ws"
    afile.write_text("")
    (problem,) = check_workspace(afile)
    assert str(problem).startswith(f"MACHINE_WORKSPACE='{afile}': is a file, not a directory;")
    assert "point MACHINE_WORKSPACE at a writable directory" in str(problem)
    (problem,) = check_workspace(afile / "below", "--workspace")
    assert f"cannot be created: {afile} is a file" in str(problem)
    assert problem.source == "--workspace"


def test_workspace_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root a chmod does not stop writes, so the check's question to the kernel is answered
    # here as for a read-only mount (access(2) fails with EROFS there).
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setattr(
        "config.settings.os.access", lambda path, mode: Path(path) != ws
    )
    (problem,) = check_workspace(ws)
    assert str(problem).startswith(f"MACHINE_WORKSPACE='{ws}': is not writable")
    assert "read-only file system" in str(problem) and "writable directory" in str(problem)
    (problem,) = check_workspace(ws / "new" / "ws")
    assert f"cannot be created: {ws} is not writable" in str(problem)
    assert check_workspace(tmp_path / "fine" / "ws") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory")
def test_workspace_read_only_by_mode(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir(mode=0o555)
    (problem,) = check_workspace(ws)
    assert "is not writable" in str(problem)


def test_toml_not_utf8(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_bytes(b'num_gpus = 2\ncomfyui_args = "caf\xe9"\n')
    (line,) = problems({"MACHINE_CONFIG": str(conf)})
    assert line.startswith(f"MACHINE_CONFIG={conf}: not UTF-8 text (byte 0xe9 at offset")
    assert "save it as UTF-8" in line


def test_toml_keys_differing_only_by_case_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text("Num_Gpus = 3\nnum_gpus = 2\n")
    (line,) = problems({"MACHINE_CONFIG": str(conf)})
    assert line.startswith(f"Num_Gpus and num_gpus (in {conf})=3 and 2:")
    assert "differ only by case" in line and "keep one (num_gpus)" in line


def test_toml_key_in_other_case_still_loses_to_env(tmp_path: Path) -> None:
    conf = tmp_path / "machine.toml"
    conf.write_text("NUM_GPUS = 3\n")
    assert load_settings({"MACHINE_CONFIG": str(conf)}).num_gpus == 3
    assert load_settings({"MACHINE_CONFIG": str(conf), "NUM_GPUS": "2"}).num_gpus == 2


@pytest.mark.parametrize("value", ["65", "100000000000000000000"])
def test_absurd_num_gpus_blames_num_gpus(value: str) -> None:
    (line,) = problems({"NUM_GPUS": value})
    assert line.startswith(f"NUM_GPUS='{value}':")
    assert "less than or equal to 64" in line and "COMFYUI_PORT_START" not in line
    assert load_settings({"NUM_GPUS": "64", "COMFYUI_PORT_START": "10000"}).num_gpus == 64


def test_git_bounds_and_the_secrets_instances_do_not_inherit(tmp_path: Path) -> None:
    from config.settings import instance_withheld_env

    s = load_settings({})
    assert (s.git_timeout, s.git_retries, s.instance_pass_env) == (120.0, 2, [])
    conf = tmp_path / "machine.toml"
    conf.write_text(
        '[[custom_nodes]]\nurl = "https://h/o/n"\nauth_env = "NODE_TOKEN"\n'
        '[[models]]\nurl = "https://h/m.safetensors"\nfolder = "checkpoints"\n'
        'auth_env = "HF_TOKEN"\n'
    )
    s = load_settings({"MACHINE_CONFIG": str(conf), "GIT_TIMEOUT": "2", "GIT_RETRIES": "0",
                       "INSTANCE_PASS_ENV": "HF_TOKEN, OTHER"})
    assert (s.git_timeout, s.git_retries, s.instance_pass_env) == (2.0, 0, ["HF_TOKEN", "OTHER"])
    assert instance_withheld_env(s) == {
        "NODE_TOKEN", "COMFYUI_REPO", "COMFYUI_CUSTOM_NODES", "MACHINE_HEALTH_TOKEN",
        "COMFYUI_ACCESS_TOKEN",
    }
    bad = problems({"INSTANCE_PASS_ENV": "1BAD,OK", "GIT_TIMEOUT": "0", "GIT_RETRIES": "-1"})
    assert any(p.startswith("INSTANCE_PASS_ENV='1BAD,OK': not environment variable names: 1BAD")
               for p in bad), bad
    assert any(p.startswith("GIT_TIMEOUT='0'") for p in bad), bad
    assert any(p.startswith("GIT_RETRIES='-1'") for p in bad), bad


ACCESS_TOKEN = "a" * 20 + "-._~"


def test_proxy_needs_a_long_url_safe_token_never_shown() -> None:
    s = load_settings({"COMFYUI_EXPOSE": "proxy", "COMFYUI_ACCESS_TOKEN": ACCESS_TOKEN})
    assert s.comfyui_expose == "proxy" and s.comfyui_internal_port_start == 18188
    assert s.comfyui_public_listen == "0.0.0.0"
    assert ACCESS_TOKEN not in repr(s) and ACCESS_TOKEN not in str(s.model_dump())
    assert load_settings({}).comfyui_expose == "none"
    (line,) = problems({"COMFYUI_EXPOSE": "proxy"})
    assert line.startswith("COMFYUI_ACCESS_TOKEN=unset: required with COMFYUI_EXPOSE=proxy")
    for bad, why in (("s3cret" * 3, "too short (18 characters)"),
                     ("a" * 30 + "/", "contains characters other than A-Z a-z 0-9 - . _ ~"),
                     ("a" * 30 + " b", "contains characters other than")):
        (line,) = problems({"COMFYUI_EXPOSE": "proxy", "COMFYUI_ACCESS_TOKEN": bad})
        assert line.startswith("COMFYUI_ACCESS_TOKEN='***': " + why), line
        assert bad not in line
    (line,) = problems({"COMFYUI_EXPOSE": "bogus"})
    assert line.startswith("COMFYUI_EXPOSE='bogus'") and "'none' or 'proxy'" in line
    (line,) = problems({"COMFYUI_PUBLIC_LISTEN": "everywhere"})
    assert line.startswith("COMFYUI_PUBLIC_LISTEN='everywhere': not an IP address")


def test_tls_files_come_as_a_readable_pair_and_only_with_the_proxy(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    proxy = {"COMFYUI_EXPOSE": "proxy", "COMFYUI_ACCESS_TOKEN": ACCESS_TOKEN}
    s = load_settings({**proxy, "COMFYUI_TLS_CERT": str(cert), "COMFYUI_TLS_KEY": str(key)})
    assert (s.comfyui_tls_cert, s.comfyui_tls_key) == (cert, key)
    (line,) = problems({**proxy, "COMFYUI_TLS_CERT": str(cert)})
    assert line.startswith(f"COMFYUI_TLS_CERT='{cert}': COMFYUI_TLS_CERT and COMFYUI_TLS_KEY")
    (line,) = problems({**proxy, "COMFYUI_TLS_CERT": str(cert),
                        "COMFYUI_TLS_KEY": str(tmp_path / "missing.pem")})
    assert line.startswith("COMFYUI_TLS_KEY=") and "not a readable file" in line
    bad = problems({"COMFYUI_TLS_CERT": str(cert), "COMFYUI_TLS_KEY": str(key)})
    assert len(bad) == 2 and all("set COMFYUI_EXPOSE=proxy" in p for p in bad), bad


def test_internal_ports_checked_against_public_and_health_ports() -> None:
    proxy = {"COMFYUI_EXPOSE": "proxy", "COMFYUI_ACCESS_TOKEN": ACCESS_TOKEN, "NUM_GPUS": "2",
             "COMFYUI_CPU_ONLY": "true"}
    (line,) = problems({**proxy, "COMFYUI_INTERNAL_PORT_START": "9187"})
    assert line.startswith("COMFYUI_INTERNAL_PORT_START=9187: internal ports 9187-9188 overlap")
    assert "MACHINE_HEALTH_PORT=9188 at 9188" in line
    (line,) = problems({**proxy, "COMFYUI_INTERNAL_PORT_START": "65535"})
    assert "past 65535; use a start <= 65534" in line
    # Without the proxy the internal ports are not used, so not checked.
    load_settings({"NUM_GPUS": "2", "COMFYUI_CPU_ONLY": "true",
                   "COMFYUI_INTERNAL_PORT_START": "8188"})
