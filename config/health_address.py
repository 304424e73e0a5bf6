"""Where a node's health server listens, read from the environment alone, without pydantic.

`status`, `wait-ready`, `logs` and the operator actions only need MACHINE_HEALTH_LISTEN and
MACHINE_HEALTH_PORT to find a running node, and loading Settings (pydantic-settings) would be
most of their run time (issue 14). ``env_health_address`` reads those two as Settings does and
answers only when it is sure to agree with Settings; otherwise (a MACHINE_CONFIG file, a value
Settings might read differently or reject) it answers None and the caller loads Settings, which
also reports a bad value the usual way. Settings takes its defaults from here, and
tests/unit/test_health_address.py checks that both agree, so they cannot drift apart.

The other settings are not read, so not checked either: asking a running node does not fail
because this shell's environment has, say, a bad NUM_GPUS (the node was started with its own)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

CONFIG_ENV = "MACHINE_CONFIG"
# Where the workspace is unless said otherwise (Settings; the warm boot's head start).
WORKSPACE_ENV = "MACHINE_WORKSPACE"
WORKSPACE_DEFAULT = "/workspace"
HEALTH_PORT_ENV = "MACHINE_HEALTH_PORT"
HEALTH_LISTEN_ENV = "MACHINE_HEALTH_LISTEN"
HEALTH_PORT_DEFAULT = 9188
HEALTH_LISTEN_DEFAULT = "0.0.0.0"
# Settings' int parsing also takes " 9188", "09188", "+9188", "9_188", "9188.0": those go to
# Settings itself. The plain spelling of a port 1-65535 is the one read here.
_PLAIN_PORT = re.compile(r"[1-9][0-9]{0,4}")
# Wildcard listen addresses: a client on the same machine reaches them on loopback.
WILDCARD_LISTEN = ("0.0.0.0", "::")


def env_health_address(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(MACHINE_HEALTH_LISTEN, MACHINE_HEALTH_PORT) as ``load_settings(environ)`` would set
    them, or None when only Settings can tell (or refuse) them."""
    # As load_settings: names are case-insensitive (the last spelling wins), empty means unset.
    env = {key.upper(): value for key, value in environ.items()}
    if env.get(CONFIG_ENV):
        return None  # the TOML file may set them: Settings reads it
    listen = env.get(HEALTH_LISTEN_ENV) or HEALTH_LISTEN_DEFAULT
    port_text = env.get(HEALTH_PORT_ENV)
    if port_text is None or port_text == "":
        port = HEALTH_PORT_DEFAULT
    elif _PLAIN_PORT.fullmatch(port_text) and int(port_text) <= 65535:
        port = int(port_text)
    else:
        return None
    try:
        ipaddress.ip_address(listen)  # Settings' check of an address (_ip_address)
    except ValueError:
        return None
    return listen, port


def health_base_url(listen: str, port: int) -> str:
    """The base URL a client on this machine reaches a health server listening on ``listen``
    and ``port`` at: loopback for a wildcard address, an IPv6 address in brackets."""
    host = "127.0.0.1" if listen in WILDCARD_LISTEN else listen
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
