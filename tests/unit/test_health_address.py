"""The health server's address read from the environment without pydantic (config/health_address.py)
agrees with Settings wherever it answers, and leaves to Settings what only Settings can tell."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.health_address import (
    HEALTH_LISTEN_DEFAULT,
    HEALTH_PORT_DEFAULT,
    env_health_address,
    health_base_url,
)
from config.settings import Settings, load_settings

# Environments the cheap reader answers for: Settings must read the same address from them.
ANSWERED = [
    {},
    {"MACHINE_HEALTH_PORT": "9999"},
    {"MACHINE_HEALTH_PORT": "1", "MACHINE_HEALTH_LISTEN": "127.0.0.1"},
    {"MACHINE_HEALTH_PORT": "65535", "MACHINE_HEALTH_LISTEN": "::1"},
    {"MACHINE_HEALTH_LISTEN": "::"},
    {"MACHINE_HEALTH_LISTEN": "::ffff:127.0.0.1"},
    {"MACHINE_HEALTH_LISTEN": "fe80::1%eth0"},
    {"MACHINE_HEALTH_PORT": "", "MACHINE_HEALTH_LISTEN": ""},  # empty means unset
    {"machine_health_port": "8000", "Machine_Health_Listen": "10.0.0.2"},  # any case
    {"MACHINE_CONFIG": "", "MACHINE_HEALTH_PORT": "9200"},  # an empty MACHINE_CONFIG: no file
    {"COMFYUI_PORT_START": "9300", "UNRELATED": "x", "MACHINE_HEALTH_PORT": "9400"},
]
# Environments it leaves to Settings: spellings Settings reads (or refuses) its own way.
LEFT_TO_SETTINGS = [
    {"MACHINE_HEALTH_PORT": value}
    for value in (" 9188", "9188 ", "09188", "+9188", "9_188", "9188.0", "abc", "0", "-1",
                  "65536", "100000", "1e3", "٩١٨٨", "0x10")
] + [
    {"MACHINE_HEALTH_LISTEN": value}
    for value in ("localhost", " 127.0.0.1", "127.000.0.1", "1.2.3", "[::1]")
]


def settings_address(env: dict[str, str]) -> tuple[str, int] | None:
    """What Settings reads, or None when it refuses the environment."""
    try:
        settings = load_settings(env)
    except ConfigError:
        return None
    return settings.machine_health_listen, settings.machine_health_port


def test_defaults_are_settings_defaults() -> None:
    fields = Settings.model_fields
    assert fields["machine_health_port"].default == HEALTH_PORT_DEFAULT
    assert fields["machine_health_listen"].default == HEALTH_LISTEN_DEFAULT


@pytest.mark.parametrize("env", ANSWERED, ids=repr)
def test_agrees_with_settings(env: dict[str, str]) -> None:
    address = env_health_address(env)
    assert address is not None
    assert address == settings_address(env)


@pytest.mark.parametrize("env", LEFT_TO_SETTINGS, ids=repr)
def test_other_spellings_are_left_to_settings(env: dict[str, str]) -> None:
    assert env_health_address(env) is None


def test_never_answers_differently_from_settings() -> None:
    # Every port spelling in and around the range: where the cheap reader answers, Settings
    # reads the same port; where Settings refuses one, the cheap reader never answers.
    for port in [*range(0, 200), *range(9180, 9200), *range(65530, 65600), 100000, 999999]:
        for text in (str(port), f"0{port}", f"{port} "):
            env = {"MACHINE_HEALTH_PORT": text}
            address = env_health_address(env)
            if address is not None:
                assert address == settings_address(env), text


def test_a_config_file_is_left_to_settings(tmp_path: Path) -> None:
    config = tmp_path / "machine.toml"
    config.write_text('machine_health_port = 9500\nmachine_health_listen = "127.0.0.1"\n')
    env = {"MACHINE_CONFIG": str(config)}
    assert env_health_address(env) is None
    assert env_health_address({"machine_config": str(config)}) is None
    assert settings_address(env) == ("127.0.0.1", 9500)


def test_base_url_reaches_a_wildcard_on_loopback() -> None:
    assert health_base_url("0.0.0.0", 9188) == "http://127.0.0.1:9188"
    assert health_base_url("::", 9188) == "http://127.0.0.1:9188"
    assert health_base_url("10.1.2.3", 1) == "http://10.1.2.3:1"
    assert health_base_url("::1", 9188) == "http://[::1]:9188"
