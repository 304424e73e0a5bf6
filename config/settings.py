"""Settings from the environment and an optional TOML file (env wins); errors name their source."""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.errors import ConfigError, Problem
from config.git_input import GitAuth, redact_urls, ref_problem, url_problem
from config.health_address import (
    CONFIG_ENV,
    HEALTH_LISTEN_DEFAULT,
    HEALTH_PORT_DEFAULT,
    WORKSPACE_DEFAULT,
)
from config.models import ENV_NAME, ModelEntry, build_model_specs
from config.nodes import (
    DEFAULT_REGISTRY_URL,
    CustomNodeEntry,
    CustomNodeSpec,
    build_node_auth,
    build_specs,
    registry_url_problem,
    snapshot_nodes,
)

# Settings whose value an error message must never show.
SECRET_FIELDS = frozenset({"machine_health_token", "comfyui_access_token"})
MIN_TOKEN_LENGTH = 16
# The token the authenticating proxy (COMFYUI_EXPOSE=proxy) asks for. It goes into URLs
# (``?token=``, ``http://user:TOKEN@host``), so it is made of characters no URL has to escape.
MIN_ACCESS_TOKEN_LENGTH = 24
ACCESS_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
# More instances than any machine has GPUs is a typo; the limit keeps the port checks sane.
MAX_GPUS = 64
# Paths the instances use from their own working directory (the install path) or that go into
# files they read: a relative one is resolved against the agent's current directory.
RESOLVED_PATH_FIELDS = (
    "machine_workspace",
    "comfyui_install_path",
    "comfyui_models_path",
    "comfyui_python",
    "comfyui_tls_cert",
    "comfyui_tls_key",
)

log = logging.getLogger(__name__)


def _printable_no_spaces(token: str) -> bool:
    return token.isprintable() and not any(c.isspace() for c in token)


def _checked_secret(
    value: SecretStr | None, min_length: int, allowed: Callable[[str], object], rule: str
) -> SecretStr | None:
    """A token setting's checks; the message never repeats the value (it is a secret)."""
    if value is None:
        return None
    token = value.get_secret_value()
    if len(token) < min_length:
        raise ValueError(f"too short ({len(token)} characters)")
    if not allowed(token):
        raise ValueError(rule)
    return value


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
        le=MAX_GPUS,
        description=f"a whole number >= 1 and <= {MAX_GPUS}; unset means every GPU found "
        "(1 in CPU mode)",
    )
    comfyui_cpu_only: bool = Field(False, description="true or false")
    comfyui_port_start: int = Field(8188, ge=1, le=65535, description="a TCP port, 1-65535")
    comfyui_listen: str = Field("127.0.0.1", description="an IPv4 or IPv6 address")
    comfyui_expose: Literal["none", "proxy"] = Field(
        "none",
        description="'none' (instances serve on COMFYUI_LISTEN themselves) or 'proxy' (each "
        "instance on 127.0.0.1, an authenticating proxy on its public port)",
    )
    comfyui_internal_port_start: int = Field(
        18188, ge=1, le=65535,
        description="a TCP port, 1-65535: with COMFYUI_EXPOSE=proxy the instance on GPU i "
        "listens on 127.0.0.1 at this + i",
    )
    comfyui_public_listen: str = Field(
        "0.0.0.0", description="an IPv4 or IPv6 address the proxy serves the public ports on"
    )
    comfyui_access_token: SecretStr | None = Field(
        None,
        description=f"a secret of at least {MIN_ACCESS_TOKEN_LENGTH} characters from A-Z a-z "
        "0-9 - . _ ~ (e.g. `openssl rand -hex 32`); the proxy lets in only requests that "
        "carry it",
    )
    comfyui_tls_cert: Path | None = Field(
        None, description="a PEM certificate file (with COMFYUI_TLS_KEY): the proxy speaks HTTPS"
    )
    comfyui_tls_key: Path | None = Field(
        None, description="the PEM private key file of COMFYUI_TLS_CERT"
    )
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
        "", description="comma-separated git URLs, each optionally @ref (commit, tag, branch), "
        "or Comfy Registry ids, each optionally @version"
    )
    custom_nodes: list[CustomNodeEntry] = Field(
        default_factory=list, description="[[custom_nodes]] tables with url and ref (git) or "
        "id and version (Comfy Registry), name, required, enabled, auth_env"
    )
    custom_nodes_snapshot: Path | None = Field(
        None, description="a ComfyUI-Manager snapshot file (.json or .yaml)"
    )
    comfy_registry_url: str = Field(
        DEFAULT_REGISTRY_URL,
        description="the Comfy Registry API's base URL, http(s)://host[/path], without "
        "credentials, query or fragment",
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
    git_timeout: float = Field(
        120.0, gt=0, le=3600,
        description="seconds a git transfer may make no progress (under 1 KB/s) before it is "
        "aborted, > 0 and <= 3600; each git command is also bounded by 10 times this",
    )
    git_retries: int = Field(
        2, ge=0, le=10, description="retries of a git command that failed transiently, 0-10"
    )
    install_retries: int = Field(
        3, ge=0, le=10,
        description="retries of the whole install phase after a transient (network) failure, "
        "with backoff, 0-10; a permanent failure is not retried",
    )
    instance_pass_env: list[str] = Field(
        default_factory=list,
        description="names of secret environment variables (auth_env of custom nodes and "
        "models) that ComfyUI instances still inherit, comma-separated",
    )
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
    machine_workspace: Path = Field(Path(WORKSPACE_DEFAULT), description="a writable directory")
    # The defaults live in config/health_address.py, which the CLI reads them with without
    # loading Settings (`status`, `wait-ready`: issue 14).
    machine_health_port: int = Field(
        HEALTH_PORT_DEFAULT, ge=1, le=65535, description="a TCP port, 1-65535"
    )
    machine_health_listen: str = Field(
        HEALTH_LISTEN_DEFAULT, description="an IPv4 or IPv6 address"
    )
    machine_health_idle_timeout: float = Field(
        30.0, gt=0, le=3600,
        description="seconds an idle keep-alive connection to the health port stays open, "
        "> 0 and <= 3600",
    )
    machine_health_max_connections: int = Field(
        10_000, ge=10, le=1_000_000,
        description="open connections the health port holds before refusing new ones, "
        "10-1000000 (lowered to stay below the open-files limit)",
    )
    machine_event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="the agent's event loop: asyncio (the standard library's) or uvloop "
        "(pip install 'comfy-machine[uvloop]')",
    )
    machine_health_token: SecretStr | None = Field(
        None,
        description="a secret of at least 16 characters, no spaces; holders read instance "
        "logs with 'Authorization: Bearer <token>'; unset: logs are not served",
    )
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
    drain_timeout: float = Field(
        300.0, ge=0, le=86400,
        description="seconds a SIGTERM waits for running and queued prompts to finish before "
        "the instances are stopped, >= 0 and <= 86400 (0: stop at once)",
    )
    instance_log_max_bytes: int = Field(
        50 * 1024 * 1024, ge=0, description="bytes per instance log file before rotation"
    )
    instance_log_backups: int = Field(5, ge=0, le=100, description="rotated log files kept")
    instance_fatal_backoff: float = Field(
        30.0, gt=0, le=86400,
        description="seconds before a FATAL or crash-looping instance is started again, "
        "doubling per attempt; > 0 and <= 86400",
    )
    instance_fatal_backoff_max: float = Field(
        600.0, gt=0, le=86400,
        description="seconds the doubling backoff stops at; > 0, <= 86400 and >= "
        "INSTANCE_FATAL_BACKOFF",
    )
    instance_stable_secs: float = Field(
        600.0, gt=0, le=7 * 86400,
        description="seconds an instance must run for its failures to be forgotten (a crash "
        "sooner counts toward the backoff); > 0 and <= 604800",
    )
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
    gpu_unhealthy_samples: int = Field(
        3, ge=1, le=1000,
        description="NVML samples in a row that must be hot or unanswered before a GPU is "
        "quarantined (a fatal Xid or uncorrected ECC error acts at once); 1-1000",
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

    @field_validator("protected_packages", "workflows", "instance_pass_env", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("instance_pass_env")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)}")
        return value

    @field_validator("comfyui_repo")
    @classmethod
    def _git_url(cls, value: str) -> str:
        problem = url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("comfy_registry_url")
    @classmethod
    def _registry_url(cls, value: str) -> str:
        problem = registry_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value.rstrip("/")

    @field_validator("comfyui_ref")
    @classmethod
    def _git_ref(cls, value: str) -> str:
        problem = ref_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("machine_health_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        return _checked_secret(value, MIN_TOKEN_LENGTH, _printable_no_spaces,
                               "contains spaces or control characters")

    @field_validator("comfyui_access_token")
    @classmethod
    def _access_token(cls, value: SecretStr | None) -> SecretStr | None:
        return _checked_secret(
            value, MIN_ACCESS_TOKEN_LENGTH, ACCESS_TOKEN_CHARS.fullmatch,
            "contains characters other than A-Z a-z 0-9 - . _ ~ (it goes into URLs)",
        )

    @field_validator("comfyui_listen", "machine_health_listen", "comfyui_public_listen")
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
    import tomllib  # here: only a MACHINE_CONFIG file needs it (the CLI starts faster, issue 14)

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            [Problem(CONFIG_ENV, str(path), "file not found; point it at a TOML file or unset it")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(
            CONFIG_ENV, str(path),
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8: save it as UTF-8",
        )]) from None
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
    file_values: dict[str, Any] = (
        _lower_keys(_read_toml(toml_path), toml_path) if toml_path else {}
    )
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
    resolved = _resolve_relative_paths(merged)
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
    for field, (given, path) in resolved.items():
        log.info(
            "relative path resolved against the current directory",
            extra={"fields": {"setting": _describe_source(field, scoped_env, toml_path),
                              "given": given, "resolved": str(path)}},
        )
    return settings


def _lower_keys(values: dict[str, Any], toml_path: Path) -> dict[str, Any]:
    """The file's top-level keys in lower case (settings are case-insensitive, so the
    environment wins over any spelling); keys that differ only by case are an error."""
    spellings: dict[str, list[str]] = {}
    for key in values:
        spellings.setdefault(key.lower(), []).append(key)
    problems = [
        Problem(
            f"{' and '.join(keys)} (in {toml_path})",
            " and ".join("'***'" if lower in SECRET_FIELDS else _show(values[key]) for key in keys),
            f"keys that differ only by case name the same setting; keep one ({lower})",
        )
        for lower, keys in spellings.items()
        if len(keys) > 1
    ]
    if problems:
        raise ConfigError(problems)
    return {key.lower(): value for key, value in values.items()}


def _resolve_relative_paths(merged: dict[str, Any]) -> dict[str, tuple[str, Path]]:
    """Make the RESOLVED_PATH_FIELDS in ``merged`` absolute (against the current directory):
    instances run elsewhere and would not find them. Returns field -> (given, resolved)."""
    resolved = {}
    for field in RESOLVED_PATH_FIELDS:
        value = merged.get(field)
        if isinstance(value, str | Path) and str(value) and not Path(value).is_absolute():
            merged[field] = Path(os.path.abspath(value))
            resolved[field] = (str(value), merged[field])
    return resolved


def check_workspace(path: Path, source: str = "MACHINE_WORKSPACE") -> list[Problem]:
    """For the commands that write the workspace (up, demo, install, models): it must be a
    directory this user can write, or creatable under one. One Problem, or none."""
    fix = f"point {source} at a writable directory (it is created if missing)"
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    what = "" if existing == path else f"cannot be created: {existing} "
    if not existing.is_dir():
        return [Problem(source, _show(str(path)), f"{what}is a file, not a directory; {fix}")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Problem(
            source, _show(str(path)),
            f"{what}is not writable (by uid {os.geteuid()}, or a read-only file system); {fix}",
        )]
    return []


def _problems(exc: ValidationError, env: dict[str, str], toml_path: Path | None) -> list[Problem]:
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        given = "***" if field in SECRET_FIELDS else err.get("input")
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
    # A git URL given with credentials (https://user:token@host/...) shows without them.
    return repr(redact_urls(value)) if isinstance(value, str) else redact_urls(str(value))


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
    if settings.instance_fatal_backoff > settings.instance_fatal_backoff_max:
        problems.append(
            Problem(
                src("instance_fatal_backoff_max"),
                _show(f"{settings.instance_fatal_backoff_max:g}"),
                f"below INSTANCE_FATAL_BACKOFF={settings.instance_fatal_backoff:g}, where the "
                "backoff starts (it doubles up to this maximum); expected a maximum >= "
                "INSTANCE_FATAL_BACKOFF",
            )
        )
    problems.extend(check_exposure(settings, env, toml_path))
    indices = planned_gpu_indices(settings)
    if indices:
        problems.extend(check_ports(settings, indices, env, toml_path))
    where = f" (in {toml_path})" if toml_path else ""
    problems.extend(build_model_specs(settings.models, where)[1])
    return problems


def planned_gpu_indices(settings: Settings) -> list[int] | None:
    """The GPU indices the instances will run on when the settings alone tell (CPU mode,
    COMFYUI_GPUS as indices, NUM_GPUS); None when only GPU discovery can (the plan checks then)."""
    if not settings.enable_comfyui:
        return None
    if settings.comfyui_cpu_only:
        return list(range(settings.num_gpus or 1))
    items = [part.strip() for part in settings.comfyui_gpus.split(",") if part.strip()]
    if items:
        return [int(item) for item in items] if all(i.isdigit() for i in items) else None
    return list(range(settings.num_gpus)) if settings.num_gpus else None


def check_ports(
    settings: Settings,
    gpus: typing.Sequence[int],
    env: dict[str, str] | None = None,
    toml_path: Path | None = None,
) -> list[Problem]:
    """The instance on GPU i listens on COMFYUI_PORT_START + i: every such port must fit in
    1-65535 and none may be the health port."""
    if not gpus:
        return []
    env = env or {}
    first = settings.comfyui_port_start
    ports = sorted(first + index for index in gpus)
    shown = _port_list(ports)
    source = _describe_source("comfyui_port_start", env, toml_path)
    if ports[-1] > 65535:
        limit = 65535 - max(gpus)
        fix = f"use a start <= {limit}" if limit >= 1 else f"no start fits GPU {max(gpus)}"
        return [
            Problem(
                source,
                str(first),
                f"{len(ports)} instances need ports {shown} (COMFYUI_PORT_START + GPU index), "
                f"past 65535; {fix}",
            )
        ]
    if settings.machine_health_port in ports:
        return [
            Problem(
                source,
                str(first),
                f"instance ports {shown} include MACHINE_HEALTH_PORT="
                f"{settings.machine_health_port}; move one of them",
            )
        ]
    if settings.comfyui_expose == "proxy":
        return _check_internal_ports(settings, gpus, ports, env, toml_path)
    return []


def _check_internal_ports(
    settings: Settings,
    gpus: typing.Sequence[int],
    public: list[int],
    env: dict[str, str],
    toml_path: Path | None,
) -> list[Problem]:
    """With the proxy, the instance on GPU i listens on COMFYUI_INTERNAL_PORT_START + i
    (127.0.0.1): those ports must fit, and be neither a public port nor the health port."""
    first = settings.comfyui_internal_port_start
    ports = sorted(first + index for index in gpus)
    shown = _port_list(ports)
    source = _describe_source("comfyui_internal_port_start", env, toml_path)
    if ports[-1] > 65535:
        limit = 65535 - max(gpus)
        fix = f"use a start <= {limit}" if limit >= 1 else f"no start fits GPU {max(gpus)}"
        return [Problem(
            source, str(first),
            f"{len(ports)} instances need internal ports {shown} (COMFYUI_INTERNAL_PORT_START "
            f"+ GPU index), past 65535; {fix}",
        )]
    clash = sorted(set(ports) & {*public, settings.machine_health_port})
    if clash:
        return [Problem(
            source, str(first),
            f"internal ports {shown} overlap the public ports {_port_list(public)} "
            f"(COMFYUI_PORT_START) or MACHINE_HEALTH_PORT={settings.machine_health_port} at "
            f"{_port_list(clash)}; move them apart",
        )]
    return []


def check_exposure(
    settings: Settings, env: dict[str, str] | None = None, toml_path: Path | None = None
) -> list[Problem]:
    """COMFYUI_EXPOSE=proxy needs the access token; TLS files come as a pair, are readable
    files, and only mean something with the proxy."""
    env = env or {}

    def src(field: str) -> str:
        return _describe_source(field, env, toml_path)

    problems: list[Problem] = []
    proxy = settings.comfyui_expose == "proxy"
    if proxy and settings.comfyui_access_token is None:
        problems.append(Problem(
            src("comfyui_access_token"), "unset",
            "required with COMFYUI_EXPOSE=proxy: the proxy lets in only requests that carry it; "
            f"set a secret of at least {MIN_ACCESS_TOKEN_LENGTH} characters (e.g. "
            "`openssl rand -hex 32`)",
        ))
    cert, key = settings.comfyui_tls_cert, settings.comfyui_tls_key
    for field, path, other in (("comfyui_tls_cert", cert, key), ("comfyui_tls_key", key, cert)):
        if path is None:
            continue
        if not proxy:
            problems.append(Problem(
                src(field), _show(str(path)),
                "TLS is served by the proxy: set COMFYUI_EXPOSE=proxy, or unset it",
            ))
        elif other is None:
            problems.append(Problem(
                src(field), _show(str(path)),
                "COMFYUI_TLS_CERT and COMFYUI_TLS_KEY come together; set both or neither",
            ))
        elif not path.is_file() or not os.access(path, os.R_OK):
            problems.append(Problem(
                src(field), _show(str(path)), "not a readable file; expected a PEM file",
            ))
    return problems


def _port_list(ports: list[int]) -> str:
    """``8188-8191`` for a run of consecutive ports, else ``8189, 8191``."""
    if len(ports) > 1 and ports == list(range(ports[0], ports[0] + len(ports))):
        return f"{ports[0]}-{ports[-1]}"
    return ", ".join(str(p) for p in ports)


def custom_node_specs(settings: Settings) -> tuple[list[CustomNodeSpec], str]:
    """The custom nodes to install and the ComfyUI ref, from env, TOML and a snapshot file.

    A snapshot's ComfyUI commit is used unless COMFYUI_REF was set. Raises ConfigError."""
    specs, comfyui_ref, _ = _custom_nodes(settings)
    return specs, comfyui_ref


def custom_node_auth(settings: Settings) -> dict[str, GitAuth]:
    """Node name -> the credentials of its git URL (userinfo, auth_env), for those with any.
    Only the installer gets these; the specs (shown everywhere) have URLs without them."""
    return _custom_nodes(settings)[2]


# Settings that can hold credentials (a git URL's userinfo) or are secrets themselves.
SECRET_ENV = (
    "COMFYUI_REPO", "COMFYUI_CUSTOM_NODES", "MACHINE_HEALTH_TOKEN", "COMFYUI_ACCESS_TOKEN",
)


def instance_withheld_env(settings: Settings) -> frozenset[str]:
    """Environment variables ComfyUI instances (and custom nodes' install.py) do not inherit:
    the tokens the node fetches with (auth_env of custom nodes and models) and the settings
    that can hold credentials, unless INSTANCE_PASS_ENV names them."""
    names = {*SECRET_ENV}
    names.update(e.auth_env for e in settings.custom_nodes if e.auth_env)
    names.update(m.auth_env for m in settings.models if m.auth_env)
    return frozenset(names - set(settings.instance_pass_env))


def input_env_names() -> list[str]:
    """Every environment variable Settings reads (config/inputs_digest.py)."""
    return sorted({name.upper() for name in Settings.model_fields} | {CONFIG_ENV})


def input_files(settings: Settings) -> list[str]:
    """Every file and directory the settings name (MACHINE_CONFIG, the snapshot, workflows,
    paths): with the environment, all that settings are read from."""
    found: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, Path):
            found.add(str(value))
        elif isinstance(value, BaseModel):
            for item in value.__dict__.values():
                walk(item)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(settings)
    return sorted(found)


def _custom_nodes(
    settings: Settings,
) -> tuple[list[CustomNodeSpec], str, dict[str, GitAuth]]:
    snapshot_entries: list[CustomNodeEntry] = []
    comfyui_ref = settings.comfyui_ref
    problems: list[Problem] = []
    path = settings.custom_nodes_snapshot
    if path is not None:
        source = f"custom_nodes_snapshot ({path})"
        import yaml  # here: only a snapshot file needs it (the CLI starts faster, issue 14)

        try:
            text = path.read_text()
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError([Problem("custom_nodes_snapshot", str(path),
                                       f"cannot be read as a ComfyUI-Manager snapshot: {exc}")]
                              ) from None
        if not isinstance(data, dict):
            raise ConfigError([Problem("custom_nodes_snapshot", str(path),
                                       "expected a mapping with 'comfyui', 'git_custom_nodes' "
                                       "and 'cnr_custom_nodes'")])
        snapshot_ref, snapshot_entries, problems = snapshot_nodes(data, source)
        if snapshot_ref and "comfyui_ref" not in settings.model_fields_set:
            comfyui_ref = snapshot_ref
            bad_ref = ref_problem(snapshot_ref)
            if bad_ref:
                problems.append(Problem(f"{source} comfyui", snapshot_ref, bad_ref))
    specs, more = build_specs(settings.comfyui_custom_nodes, settings.custom_nodes,
                              snapshot_entries, "custom_nodes_snapshot")
    problems += more
    if problems:
        raise ConfigError(problems)
    auth = build_node_auth(settings.comfyui_custom_nodes, settings.custom_nodes,
                           snapshot_entries, "custom_nodes_snapshot")
    return specs, comfyui_ref, auth
