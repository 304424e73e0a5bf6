"""Settings from the environment and an optional TOML file (env wins); errors name their source."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.errors import ConfigError, Problem
from config.models import ModelEntry, build_model_specs
from config.nodes import CustomNodeEntry, CustomNodeSpec, build_specs, snapshot_nodes

CONFIG_ENV = "MACHINE_CONFIG"


class Settings(BaseSettings):
    """Everything a node is configured with. Env names are the field names in upper case;
    TOML keys are the field names."""

    model_config = SettingsConfigDict(
        extra="forbid",
        case_sensitive=False,
        env_ignore_empty=True,
        validate_default=True,
    )

    enable_comfyui: bool = Field(True, description="true or false")
    num_gpus: int | None = Field(
        None,
        ge=0,
        description="a whole number >= 1; unset means every GPU found (1 in CPU mode)",
    )
    comfyui_cpu_only: bool = Field(False, description="true or false")
    comfyui_port_start: int = Field(8188, ge=1, le=65535, description="a TCP port, 1-65535")
    comfyui_listen: str = Field("127.0.0.1", description="an IPv4 or IPv6 address")
    comfyui_args: str = Field("", description="extra ComfyUI flags, shell-quoted")
    comfyui_repo: str = Field("https://github.com/Comfy-Org/ComfyUI.git", description="a git URL")
    comfyui_ref: str = Field("v0.3.64", min_length=1, description="a commit, tag or branch")
    comfyui_install_path: Path | None = Field(
        None, description="a directory; default <MACHINE_WORKSPACE>/ComfyUI"
    )
    comfyui_models_path: Path | None = Field(
        None, description="a directory; default <MACHINE_WORKSPACE>/models"
    )
    comfyui_python: Path | None = Field(
        None,
        description="an existing Python interpreter for ComfyUI, used as is; "
        "default a managed virtualenv at <MACHINE_WORKSPACE>/venv",
    )
    comfyui_custom_nodes: str = Field(
        "", description="comma-separated git URLs, each optionally @ref (commit, tag, branch)"
    )
    custom_nodes: list[CustomNodeEntry] = Field(
        default_factory=list, description="[[custom_nodes]] tables with url, ref, name, "
        "required, enabled"
    )
    custom_nodes_snapshot: Path | None = Field(
        None, description="a ComfyUI-Manager snapshot file (.json or .yaml)"
    )
    protected_packages: list[str] = Field(
        default_factory=list,
        description="package names no custom node may upgrade or replace (besides the torch "
        "family), comma-separated in the environment",
    )
    on_conflict: Literal["fail", "skip-node"] = Field(
        "fail", description="'fail' or 'skip-node'"
    )
    install_py_timeout: float = Field(
        600.0, gt=0, description="seconds a custom node's install.py may run, > 0"
    )
    install_workers: int = Field(4, ge=1, le=32, description="parallel git clones, 1-32")
    install_min_free_gb: float = Field(
        5.0, ge=0, description="GiB that must be free in the workspace before installing, >= 0"
    )
    models: list[ModelEntry] = Field(
        default_factory=list,
        description="[[models]] tables with url, folder, filename, size, sha256, auth_env, "
        "required, when",
    )
    workflows: list[Path] = Field(
        default_factory=list,
        description="ComfyUI API-format workflow JSON files whose model files every instance "
        "must list (relative to the TOML file), comma-separated in the environment",
    )
    download_workers: int = Field(4, ge=1, le=32, description="parallel model downloads, 1-32")
    download_retries: int = Field(
        5, ge=0, le=100, description="retries of a dropped model download (with backoff), 0-100"
    )
    machine_workspace: Path = Field(Path("/workspace"), description="a writable directory")
    machine_health_port: int = Field(9188, ge=1, le=65535, description="a TCP port, 1-65535")
    machine_health_listen: str = Field("0.0.0.0", description="an IPv4 or IPv6 address")
    machine_config: Path | None = Field(None, description="a TOML file")
    max_queue_depth: int | None = Field(
        None, ge=1, description="a whole number >= 1; unset means no limit"
    )
    probe_interval: float = Field(2.0, gt=0, le=60, description="seconds, > 0 and <= 60")
    probe_timeout: float = Field(5.0, gt=0, le=120, description="seconds, > 0 and <= 120")
    smoke_timeout: float = Field(120.0, gt=0, description="seconds, > 0")
    instance_startsecs: int = Field(
        10, ge=0, le=600, description="seconds an instance must stay up to count as started"
    )
    instance_start_retries: int = Field(
        3, ge=0, le=100, description="failed starts in a row before an instance is FATAL"
    )
    instance_stop_timeout: int = Field(
        5, ge=1, le=60, description="seconds between SIGINT and the group kill on stop"
    )
    instance_log_max_bytes: int = Field(
        50 * 1024 * 1024, ge=0, description="bytes per instance log file before rotation"
    )
    instance_log_backups: int = Field(5, ge=0, le=100, description="rotated log files kept")
    comfyui_gpus: str = Field(
        "", description="comma-separated GPU indices or UUIDs (GPU-...); unset means NUM_GPUS"
    )
    gpu_sample_interval: float = Field(
        5.0, gt=0, le=300, description="seconds between NVML health samples, > 0 and <= 300"
    )
    gpu_max_temperature_celsius: float = Field(
        90.0, gt=0, description="°C above which a GPU is quarantined"
    )
    gpu_max_ecc_uncorrected: int = Field(
        0, ge=0, description="uncorrected ECC errors a GPU may have before it is quarantined"
    )
    gpu_ignored_xids: list[int] = Field(
        default_factory=lambda: [13, 31, 43, 45, 68],
        description="Xid codes that are application errors, not GPU faults, comma-separated",
    )
    gpu_selftest: bool = Field(True, description="true or false: sentinel self-test per GPU")
    gpu_selftest_cache_hours: float = Field(
        24.0, ge=0, description="hours a passed self-test counts for the same GPU and driver"
    )
    gpu_selftest_timeout: float = Field(
        60.0, gt=0, description="seconds the self-test (incl. torch import) may take, > 0"
    )
    machine_fake_nvml: Path | None = Field(
        None, description="a JSON file describing fake GPUs (tests and demos only)"
    )

    @field_validator("gpu_ignored_xids", mode="before")
    @classmethod
    def _int_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("protected_packages", "workflows", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("comfyui_listen", "machine_health_listen")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("not an IP address") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges TOML < env < overrides itself, so the environment a test or the
        # demo passes is the only one read, and the source of each value stays known.
        return (init_settings,)

    # Derived paths: one place decides the workspace layout.
    @property
    def install_path(self) -> Path:
        return self.comfyui_install_path or self.machine_workspace / "ComfyUI"

    @property
    def models_path(self) -> Path:
        return self.comfyui_models_path or self.machine_workspace / "models"

    @property
    def venv_path(self) -> Path | None:
        """The managed virtualenv, or None when COMFYUI_PYTHON names an interpreter to use."""
        return None if self.comfyui_python else self.machine_workspace / "venv"

    @property
    def python(self) -> Path:
        return self.comfyui_python or self.machine_workspace / "venv" / "bin" / "python"


def _describe_source(field: str, env: dict[str, str], toml_path: Path | None) -> str:
    if field.upper() in env:
        return field.upper()
    if toml_path is not None:
        return f"{field} (in {toml_path})"
    return field.upper()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            [Problem(CONFIG_ENV, str(path), "file not found; point it at a TOML file or unset it")]
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            [Problem(CONFIG_ENV, str(path), f"cannot be read as TOML: {exc}")]
        ) from None


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment and MACHINE_CONFIG; ConfigError lists every problem.

    ``overrides`` win over everything (used by the demo and tests)."""
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    config_path_text = overrides.get("machine_config") or env.get(CONFIG_ENV) or None
    toml_path = Path(config_path_text) if config_path_text else None
    file_values: dict[str, Any] = _read_toml(toml_path) if toml_path else {}
    if toml_path:
        file_values["machine_config"] = toml_path
        snapshot = file_values.get("custom_nodes_snapshot")
        if isinstance(snapshot, str) and not Path(snapshot).is_absolute():
            file_values["custom_nodes_snapshot"] = str(toml_path.parent / snapshot)
        workflows = file_values.get("workflows")
        if isinstance(workflows, list):
            file_values["workflows"] = [
                str(toml_path.parent / w) if isinstance(w, str) else w for w in workflows
            ]
    # Only our own variables are read; others in the environment are none of our business.
    known = {name.upper() for name in Settings.model_fields}
    scoped_env = {k: v for k, v in env.items() if k in known and v != ""}
    merged = {**file_values, **{k.lower(): v for k, v in scoped_env.items()}, **overrides}
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        problems = _problems(exc, scoped_env, toml_path)
        # Also report what the valid fields get wrong together, so one run lists every problem.
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        try:
            rest = Settings(**{k: v for k, v in merged.items() if k not in bad})
        except ValidationError:
            rest = None
        if rest is not None:
            problems += [
                p
                for p in check_settings(rest, scoped_env, toml_path)
                if p.source.split(" ")[0].lower() not in bad
            ]
        raise ConfigError(problems) from None
    problems = check_settings(settings, scoped_env, toml_path)
    if problems:
        raise ConfigError(problems)
    return settings


def _problems(exc: ValidationError, env: dict[str, str], toml_path: Path | None) -> list[Problem]:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        given = err.get("input")
        if len(err["loc"]) > 1:  # inside a table of the TOML file, e.g. custom_nodes[0].url
            path = field + "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"][1:]
            )
            where = f"{path} (in {toml_path})" if toml_path else path
            message = err["msg"]
            table = _table_fields(field)
            if err["type"] == "extra_forbidden" and table:
                close = difflib.get_close_matches(str(err["loc"][-1]), table, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                message = f"unknown key; {hint}accepted keys: {', '.join(table)}"
            problems.append(Problem(where, _show(given), message))
            continue
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, Settings.model_fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            accepted = ", ".join(sorted(Settings.model_fields))
            problems.append(
                Problem(
                    f"{field} (in {toml_path})" if toml_path else field,
                    _show(given),
                    f"unknown key; {hint}accepted keys: {accepted}",
                )
            )
            continue
        info = Settings.model_fields.get(field)
        accepted = info.description if info and info.description else ""
        reason = err["msg"].removeprefix("Value error, ")
        problems.append(
            Problem(
                _describe_source(field, env, toml_path),
                _show(given),
                f"{reason}; expected {accepted}" if accepted else reason,
            )
        )
    return problems


def _table_fields(field: str) -> list[str]:
    """The keys a ``[[field]]`` table accepts, when ``field`` is a list of models."""
    info = Settings.model_fields.get(field)
    for arg in typing.get_args(info.annotation) if info else ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return list(arg.model_fields)
    return []


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# Flags whose value the plan decides; a user setting them would break the port/GPU layout.
OWNED_FLAGS = {
    "--port": "ports come from COMFYUI_PORT_START (instance i gets COMFYUI_PORT_START + i)",
    "--listen": "set COMFYUI_LISTEN instead",
    "--cuda-device": "each instance sees exactly its own GPU through CUDA_VISIBLE_DEVICES",
    "--output-directory": "outputs are shared under MACHINE_WORKSPACE/output",
    "--input-directory": "inputs are shared under MACHINE_WORKSPACE/input",
    "--extra-model-paths-config": "models come from COMFYUI_MODELS_PATH through the generated "
    "<MACHINE_WORKSPACE>/run/extra_model_paths.yaml",
}


def owned_flag(token: str) -> str | None:
    """The plan-owned flag that ``token`` sets (argparse accepts unique prefixes), if any."""
    if not token.startswith("--") or len(token) < 4:
        return None
    name = token.split("=", 1)[0]
    for flag in OWNED_FLAGS:
        if flag == name or (flag.startswith(name) and name not in ("--cpu",)):
            return flag
    return None


def check_settings(
    settings: Settings, env: dict[str, str] | None = None, toml_path: Path | None = None
) -> list[Problem]:
    """Cross-field checks pydantic cannot express; one Problem per issue."""
    import shlex

    env = env or {}

    def src(field: str) -> str:
        return _describe_source(field, env, toml_path)

    problems: list[Problem] = []
    if settings.enable_comfyui and settings.num_gpus == 0:
        problems.append(
            Problem(
                src("num_gpus"),
                "0",
                "ComfyUI is enabled, so at least one instance is needed; set NUM_GPUS >= 1, "
                "unset it to use every GPU found, or set ENABLE_COMFYUI=false",
            )
        )
    try:
        tokens = shlex.split(settings.comfyui_args)
    except ValueError as exc:
        problems.append(
            Problem(src("comfyui_args"), _show(settings.comfyui_args), f"cannot be parsed: {exc}")
        )
        tokens = []
    for token in tokens:
        flag = owned_flag(token)
        if flag:
            problems.append(
                Problem(
                    src("comfyui_args"),
                    _show(settings.comfyui_args),
                    f"{token} is set by comfy-machine's plan, not by COMFYUI_ARGS: "
                    f"{OWNED_FLAGS[flag]}",
                )
            )
    if settings.num_gpus:
        problems.extend(check_ports(settings, settings.num_gpus, env, toml_path))
    where = f" (in {toml_path})" if toml_path else ""
    problems.extend(build_model_specs(settings.models, where)[1])
    return problems


def check_ports(
    settings: Settings, count: int, env: dict[str, str] | None = None, toml_path: Path | None = None
) -> list[Problem]:
    """The instance port range must fit in 1-65535 and must not include the health port."""
    env = env or {}
    first, last = settings.comfyui_port_start, settings.comfyui_port_start + count - 1
    source = _describe_source("comfyui_port_start", env, toml_path)
    if last > 65535:
        return [
            Problem(
                source,
                str(first),
                f"{count} instances need ports {first}-{last}, past 65535; "
                f"use a start <= {65536 - count}",
            )
        ]
    if first <= settings.machine_health_port <= last:
        return [
            Problem(
                source,
                str(first),
                f"instance ports {first}-{last} include MACHINE_HEALTH_PORT="
                f"{settings.machine_health_port}; move one of them",
            )
        ]
    return []


def custom_node_specs(settings: Settings) -> tuple[list[CustomNodeSpec], str]:
    """The custom nodes to install and the ComfyUI ref, from env, TOML and a snapshot file.

    A snapshot's ComfyUI commit is used unless COMFYUI_REF was set. Raises ConfigError."""
    snapshot_entries: list[CustomNodeEntry] = []
    comfyui_ref = settings.comfyui_ref
    problems: list[Problem] = []
    path = settings.custom_nodes_snapshot
    if path is not None:
        source = f"custom_nodes_snapshot ({path})"
        try:
            text = path.read_text()
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError([Problem("custom_nodes_snapshot", str(path),
                                       f"cannot be read as a ComfyUI-Manager snapshot: {exc}")]
                              ) from None
        if not isinstance(data, dict):
            raise ConfigError([Problem("custom_nodes_snapshot", str(path),
                                       "expected a mapping with 'comfyui' and 'git_custom_nodes'")])
        snapshot_ref, snapshot_entries, problems = snapshot_nodes(data, source)
        if snapshot_ref and "comfyui_ref" not in settings.model_fields_set:
            comfyui_ref = snapshot_ref
    specs, more = build_specs(settings.comfyui_custom_nodes, settings.custom_nodes,
                              snapshot_entries, "custom_nodes_snapshot")
    problems += more
    if problems:
        raise ConfigError(problems)
    return specs, comfyui_ref
