"""What a git ref or repository URL may be, checked where it enters (env, TOML, snapshot).

Pure. Refs and URLs reach git's command line, so anything git could read as an option
(a leading ``-``) or a transport it should not use is refused here, with the rule broken."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

HEX_COMMIT = re.compile(r"^[0-9a-fA-F]{7,64}$")
# scp-like ssh syntax: git@github.com:owner/repo.git (host and path never start with '-').
SCP_URL = re.compile(r"^[\w.-]+@(?!-)[\w.-]+:(?![-/])[\w./~-]+$")
URL_SCHEMES = ("https", "http", "ssh", "file")
URL_FORMS = (
    "use https://host/owner/repo(.git), ssh://git@host/owner/repo, git@host:owner/repo.git, "
    "file:///path or an absolute path"
)
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \ anywhere.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# The userinfo of a URL inside any text (messages, git's stderr): scheme://<userinfo>@host.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")


@dataclass(frozen=True)
class GitAuth:
    """Credentials for one repository, never shown: the userinfo (``user:token``) its URL was
    given with, and/or the name of the environment variable holding a token (``auth_env``).
    They reach git through its environment only (an Authorization header for that URL)."""

    userinfo: str | None = field(default=None, repr=False)
    token_env: str | None = None


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(``url`` without credentials, the ``user:password`` it carried or None).

    Only http(s) URLs carry credentials for git; an ssh URL keeps its user (``git@``, no
    secret) and loses a password, which ssh would not use anyway."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ssh") or "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if parts.scheme == "ssh":
        user = userinfo.partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}@{hostport}" if user else hostport)), None
    return urlunsplit(parts._replace(netloc=hostport)), userinfo or None


def public_git_url(url: str) -> str:
    """``url`` as it may be shown, stored and logged: without credentials."""
    return split_userinfo(url)[0]


def redact_urls(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is not a commit, tag or branch git accepts as a name; None if it is."""
    if not ref:
        return "is empty; give a commit, tag or branch"
    if ref.startswith("-"):
        return "starts with '-', which git would read as an option; give a commit, tag or branch"
    if HEX_COMMIT.match(ref):
        return None
    rule = _ref_format_rule(ref)
    if rule:
        return f"is not a valid git ref name ({rule}); give a commit, tag or branch"
    return None


def _ref_format_rule(ref: str) -> str | None:
    """The first rule of ``git check-ref-format`` that ``ref`` breaks, or None."""
    if _REF_FORBIDDEN.search(ref):
        return "no spaces, control characters or any of ~ ^ : ? * [ \\"
    if ref == "@" or "@{" in ref:
        return "not '@' and no '@{'"
    if ".." in ref:
        return "no '..'"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "no leading, trailing or doubled '/'"
    if ref.endswith("."):
        return "no trailing '.'"
    for part in ref.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "no part starting with '.' or ending with '.lock'"
    return None


def url_problem(url: str) -> str | None:
    """Why git must not be given ``url``; None for https, http, ssh, file or an absolute path."""
    if not url or url.startswith("-"):
        return f"is not a git URL (it would be read as an option); {URL_FORMS}"
    if _CONTROL_OR_SPACE.search(url):
        return f"contains spaces or control characters; {URL_FORMS}"
    if url.startswith("/"):
        return None
    if SCP_URL.match(url):
        return None
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        if not parts.scheme:
            return f"is not a git URL (a relative path?); {URL_FORMS}"
        return f"uses the {parts.scheme}: transport, which is not allowed; {URL_FORMS}"
    if parts.scheme == "file":
        return None if parts.path.startswith("/") and parts.path.strip("/") else (
            f"a file URL needs an absolute path; {URL_FORMS}"
        )
    host = parts.hostname or ""
    if not host or host.startswith("-") or not parts.path.strip("/"):
        return f"needs a host and a repository path; {URL_FORMS}"
    return None
