"""Caddy's configuration for the authenticating proxy, from a ProxyPlan and the token (pure).

Caddy's own JSON, not a Caddyfile: Caddy 2.6 (what Debian 12 and Ubuntu 24.04 ship) can turn
off the autosave of the running config (``admin.config.persist``) only in JSON, and a Caddyfile
would otherwise have Caddy write a second copy of the token to ``autosave.json``. JSON also
carries the token and the patterns derived from it exactly, with no Caddyfile quoting.

Who gets through, checked by Caddy's built-in matchers (no module, no hash, no round trip to
the agent; Go's regexp runs in linear time):
- ``Authorization: Bearer <token>``;
- HTTP basic auth with the token as the password and any user name (``http://user:TOKEN@host``):
  a pattern over the base64 text that matches exactly ``base64(<any user>:<token>)``
  (``basic_pattern``). Caddy's ``basic_auth`` would need a bcrypt hash, checked on every
  request (~50 ms at cost 10: ComfyUI's UI makes hundreds of requests), and one fixed user;
- the cookie ``comfy_machine_token=<token>``, which ``?token=<token>`` sets once (HttpOnly,
  SameSite=Lax, Secure with TLS): that request is answered with a redirect to the same URL
  without the token, so it leaves the address bar and never reaches ComfyUI.
Anything else gets a 401 from Caddy itself: nothing of ComfyUI is sent. The Authorization
header and the cookie are removed before a request goes on to ComfyUI, so neither ComfyUI nor
a custom node ever sees the token. Websockets pass through (Caddy's reverse proxy upgrades
them), responses are flushed as they come (``flush_interval: -1``: ``/view`` streams), and
request bodies are not limited here (ComfyUI's own ``--max-upload-size`` applies)."""

from __future__ import annotations

import base64
import json
from typing import Any

from config.settings import ACCESS_TOKEN_CHARS
from services.plan import ProxyPlan, ProxyRoute

COOKIE_NAME = "comfy_machine_token"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
CERT_TAG = "comfy-machine"
# Seconds Caddy lets requests finish at a stop (supervisord kills it after stopwaitsecs anyway).
GRACE_PERIOD = "2s"
# A request head must arrive within this (a slow-loris client cannot hold connections open).
READ_HEADER_TIMEOUT = "10s"
UNAUTHORIZED_BODY = (
    "401 Unauthorized: this ComfyUI needs its access token (COMFYUI_ACCESS_TOKEN): send "
    "'Authorization: Bearer <token>', use basic auth with the token as the password "
    "(http://user:<token>@host:port), or open http://host:port/?token=<token> once in a "
    "browser.\n"
)

# Any ``token`` parameter in a raw query string.
QUERY_TOKEN_PATTERN = "(?:^|&)token="

_B64 = "A-Za-z0-9+/"
_ANY = f"[{_B64}]"
# The base64 digits whose value is a multiple of 4, and those that are 3 modulo 16 (below).
_MULTIPLE_OF_4 = "[AEIMQUYcgkosw048]"
_THREE_MOD_16 = "[DTjz]"


def _literal(text: str) -> str:
    """``text`` as a regular expression that matches it alone (Go's RE2 and Python's re agree:
    a backslash before an ASCII punctuation character makes it literal)."""
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def _check(token: str) -> str:
    if not ACCESS_TOKEN_CHARS.fullmatch(token):
        raise ValueError("the access token has characters other than A-Z a-z 0-9 - . _ ~")
    return token


def bearer_pattern(token: str) -> str:
    """``Authorization: Bearer <token>`` (the scheme's case does not matter, RFC 9110)."""
    return f"^(?i:bearer) +{_literal(_check(token))}$"


def basic_pattern(token: str) -> str:
    """``Authorization: Basic base64(<user>:<token>)`` for any user name, and nothing else.

    The encoded text is ``<user>:<token>`` in groups of three bytes, four digits each. Where
    the token starts in its group depends only on len(user) % 3, so the digits after the
    user's whole groups are fixed for each of the three cases, up to the few bits the user's
    last bytes share a digit with:
    - len(user) % 3 == 0: the ':' opens a group: exactly base64(':' + token);
    - len(user) % 3 == 1: group (u, ':', t0): a digit from u, a digit holding u's last two
      bits over the high bits of ':' (0b0011: D, T, j or z), then base64(x + ':' + token)[2:];
    - len(user) % 3 == 2: group (u, v, ':'): two digits from u and v, a digit holding v's
      last four bits over ':''s top bits (00: a multiple of 4), then the rest, fixed.
    The user's whole groups are any four digits. So the pattern accepts exactly the
    encodings of "<anything>:<token>": the password is the token (a user name cannot hold a
    ':', and one that did would still have to be followed by the whole token)."""
    raw = _check(token).encode()
    one = base64.b64encode(b":" + raw).decode()
    two = base64.b64encode(b"\0:" + raw).decode()[2:]
    three = base64.b64encode(b"\0\0:" + raw).decode()[3:]
    tails = "|".join((
        _literal(one),
        f"{_ANY}{_THREE_MOD_16}{_literal(two)}",
        f"{_ANY}{_ANY}{_MULTIPLE_OF_4}{_literal(three)}",
    ))
    return f"^(?i:basic) +(?:{_ANY}{_ANY}{_ANY}{_ANY})*(?:{tails})$"


def cookie_pattern(token: str) -> str:
    """A ``Cookie`` header that holds ``comfy_machine_token=<token>`` among its cookies."""
    return f"(?:^|;) *{COOKIE_NAME}={_literal(_check(token))} *(?:;|$)"


def query_pattern(token: str) -> str:
    """A raw query string with ``token=<token>`` among its parameters."""
    return f"(?:^|&)token={_literal(_check(token))}(?:&|$)"


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _login(token: str, secure: bool) -> dict[str, Any]:
    """``?token=<token>``: set the cookie, and send the browser to the same URL without it."""
    cookie = f"{COOKIE_NAME}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    return {
        "match": [{"vars_regexp": {"{http.request.uri.query}": {"pattern": query_pattern(token)}}}],
        "handle": [
            {"handler": "headers",
             "response": {"set": {"Set-Cookie": [cookie + ("; Secure" if secure else "")],
                                  "Cache-Control": ["no-store"]}}},
            {"handler": "rewrite", "uri_substring": [{"find": f"token={token}", "replace": ""}]},
            # An absolute URL on the host asked for: a path like //elsewhere stays a path.
            {"handler": "static_response", "status_code": 303,
             "headers": {"Location": [
                 "{http.request.scheme}://{http.request.hostport}{http.request.uri}"]}},
        ],
        "terminal": True,
    }


def _proxy(token: str, route: ProxyRoute) -> dict[str, Any]:
    """A request with the token goes on to the instance, without the token. One that also
    carries some other ``?token=`` is refused: a wrong token never travels on (nor into a log
    line of Caddy's, which names the URL of a request the instance did not answer)."""
    no_other_token = {"not": [{"vars_regexp": {
        "{http.request.uri.query}": {"pattern": QUERY_TOKEN_PATTERN}}}]}
    return {
        "match": [
            {"header_regexp": {"Authorization": {"pattern": bearer_pattern(token)}},
             **no_other_token},
            {"header_regexp": {"Authorization": {"pattern": basic_pattern(token)}},
             **no_other_token},
            {"header_regexp": {"Cookie": {"pattern": cookie_pattern(token)}}, **no_other_token},
        ],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": route.upstream}],
            "flush_interval": -1,
            "headers": {"request": {
                "delete": ["Authorization"],
                "replace": {"Cookie": [
                    {"search_regexp": f"; *{COOKIE_NAME}=[^;]*", "replace": ""},
                    {"search_regexp": f"^ *{COOKIE_NAME}=[^;]*(?:; *)?", "replace": ""},
                ]},
            }},
        }],
        "terminal": True,
    }


def _unauthorized() -> dict[str, Any]:
    return {
        "handle": [{
            "handler": "static_response",
            "status_code": 401,
            "headers": {
                # Browsers ask for a user and password: any user, the token as the password.
                "WWW-Authenticate": ['Basic realm="ComfyUI (comfy-machine)", charset="UTF-8"'],
                "Content-Type": ["text/plain; charset=utf-8"],
                "Cache-Control": ["no-store"],
            },
            "body": UNAUTHORIZED_BODY,
            "close": False,
        }],
        "terminal": True,
    }


def caddy_config(plan: ProxyPlan, token: str) -> dict[str, Any]:
    """The whole Caddy configuration: one server per public port, each in front of its
    instance; no admin endpoint, no autosave, no automatic HTTPS (no ACME, no redirects)."""
    secure = plan.tls_cert is not None
    servers: dict[str, Any] = {}
    for route in plan.routes:
        server: dict[str, Any] = {
            "listen": [_listen(plan.listen, route.public_port)],
            "read_header_timeout": READ_HEADER_TIMEOUT,
            # No HTTP/3: it would take the UDP port too, and websockets need HTTP/1.1.
            "protocols": ["h1", "h2"],
            "automatic_https": {"disable": True},
            "routes": [_login(token, secure), _proxy(token, route), _unauthorized()],
        }
        if secure:
            server["tls_connection_policies"] = [
                {"certificate_selection": {"any_tag": [CERT_TAG]}}
            ]
        servers[f"gpu{route.gpu}"] = server
    apps: dict[str, Any] = {"http": {"grace_period": GRACE_PERIOD, "servers": servers}}
    if secure:
        apps["tls"] = {"certificates": {"load_files": [
            {"certificate": str(plan.tls_cert), "key": str(plan.tls_key), "tags": [CERT_TAG]}
        ]}}
    return {
        "admin": {"disabled": True, "config": {"persist": False}},
        "logging": {"logs": {"default": {"encoder": {"format": "json"}}}},
        "apps": apps,
    }


def render_caddy_config(plan: ProxyPlan, token: str) -> str:
    """The configuration file's text (it holds the token: written 0600, never shown)."""
    return json.dumps(caddy_config(plan, token), indent=2) + "\n"
