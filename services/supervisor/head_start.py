"""A warm boot's head start: supervisord, and with it every instance, started from the previous
boot's record before the agent has even read its settings (loading Settings, pydantic, takes
~0.2 s of a warm boot on 2 cores; issue 14).

A boot that verified its installation leaves a record (``<workspace>/run/head-start.json``):
one digest of every input its settings were read from (the settings' environment variables,
the files they name, the working directory, the user, the Python, the agent's own code), the
supervisord.conf that starts every instance at once, the ports they take and what they do not
inherit. The next ``up`` computes the same digest from its own inputs, with the standard library
alone; only when it matches does it start supervisord from the record, here. Then the boot reads
its settings as always and keeps what was started only if its own plan gives the very same conf,
withheld variables and model paths and the installation matches its lock (machine.warm_start);
otherwise it stops it all before anything is reported. So a wrong guess costs time, never a
wrong answer. CPU mode only: in GPU mode NVML and the GPU self-test come before any instance.

The record holds nothing that supervisord.conf beside it does not (0600, in the 0700 run
directory): the settings that can hold a secret are part of the digest only."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from config.health_address import CONFIG_ENV, WORKSPACE_DEFAULT, WORKSPACE_ENV
from config.inputs_digest import inputs_digest
from services.fdlimit import raise_fd_limit
from services.files import atomic_write_text, open_private
from services.ports import port_in_use
from services.supervisor.launch import supervisord_argv
from services.supervisor.pidfile import running_supervisord

log = logging.getLogger(__name__)

RECORD_NAME = "head-start.json"


@dataclass(frozen=True)
class Record:
    """What a verified boot leaves for the next one's head start."""

    digest: str
    env_names: tuple[str, ...]  # the environment variables Settings reads
    files: tuple[str, ...]  # the files and directories its settings name
    workspace: str
    conf_path: str
    pidfile: str  # supervisord's: a live one on this conf means no head start
    conf: str  # supervisord.conf with every instance started at once
    instances: tuple[str, ...]  # their program names
    output_path: str  # supervisord's stdout and stderr
    events_socket: str
    ports: tuple[tuple[str, int], ...]  # (listen, port) of every instance
    withheld_env: tuple[str, ...]  # what supervisord (and the instances) do not inherit
    dirs: tuple[str, ...]  # directories that must exist before an instance starts
    extra_model_paths: str | None
    extra_model_paths_yaml: str


def record_path(workspace: Path) -> Path:
    return workspace / "run" / RECORD_NAME


def write_record(record: Record) -> None:
    """Leave ``record`` for the next boot (0600, atomically)."""
    atomic_write_text(
        record_path(Path(record.workspace)), json.dumps(dataclasses.asdict(record)), mode=0o600
    )


def remove_record(workspace: Path) -> None:
    with contextlib.suppress(OSError):
        record_path(workspace).unlink()


def read_record(path: Path) -> Record | None:
    """The record at ``path``; None when there is none or it cannot be used as it is."""
    try:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(Record)}
        if not isinstance(data, dict) or set(data) != fields:
            return None
        data["ports"] = tuple((str(h), int(p)) for h, p in data["ports"])
        for name in ("env_names", "files", "instances", "withheld_env", "dirs"):
            data[name] = tuple(str(v) for v in data[name])
        return Record(**data)
    except (OSError, ValueError, TypeError):
        return None


def guess_workspace(environ: Mapping[str, str]) -> Path:
    """The workspace Settings would most likely name (MACHINE_WORKSPACE, else the TOML file's
    machine_workspace, else the default). A wrong guess only means no head start."""
    env = {key.upper(): value for key, value in environ.items()}
    given = env.get(WORKSPACE_ENV)
    if not given and env.get(CONFIG_ENV):
        import tomllib

        try:
            with open(env[CONFIG_ENV], "rb") as fh:
                table = {k.lower(): v for k, v in tomllib.load(fh).items()}
            given = table.get("machine_workspace")
        except (OSError, ValueError):
            given = None
    if isinstance(given, str) and given:
        return Path(os.path.abspath(given))
    return Path(WORKSPACE_DEFAULT)


class HeadStart:
    """A supervisord started from a record, for the boot to adopt (or to stop)."""

    def __init__(
        self, record: Record, proc: subprocess.Popen[bytes], events: socket.socket
    ) -> None:
        self.record = record
        self.proc = proc
        self.events = events  # bound before supervisord started: no event is lost
        self.adopted = False

    def stop(self, grace: float) -> None:
        """Stop supervisord (it stops its programs) and wait; after ``grace``, kill what is left
        of it and of every process under it (each program is its own process group)."""
        self.events.close()
        with contextlib.suppress(OSError):
            os.unlink(self.record.events_socket)
        try:
            tree = [psutil.Process(self.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.error("head start's supervisord did not stop in time; killing its process tree",
                      extra={"fields": {"grace_s": grace}})
        for leftover in tree:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        self.proc.wait()


def _why_not(record: Record, environ: Mapping[str, str]) -> str | None:
    """Why the record cannot start this boot, or None."""
    if inputs_digest(environ, record.env_names, record.files) != record.digest:
        return "the settings' inputs changed since the last boot"
    for host, port in record.ports:
        holder = port_in_use(host, port)
        if holder:
            return f"port {port} is in use by {holder}"
    if running_supervisord(Path(record.pidfile), Path(record.conf_path)) is not None:
        return "a supervisord of this workspace is still running"
    if record.extra_model_paths is not None:
        try:
            if Path(record.extra_model_paths).read_text() != record.extra_model_paths_yaml:
                return "extra_model_paths.yaml changed"
        except OSError:
            return "extra_model_paths.yaml is missing"
    return None


def try_head_start(environ: Mapping[str, str], workspace: Path) -> HeadStart | None:
    """supervisord started from ``workspace``'s record if it was made from these very inputs;
    None otherwise. The caller holds the workspace's owner lock."""
    record = read_record(record_path(workspace))
    if record is None or Path(record.workspace) != workspace:
        return None
    reason = _why_not(record, environ)
    if reason is not None:
        log.info("no head start", extra={"fields": {"reason": reason}})
        return None
    raise_fd_limit()  # children inherit the open-files limit, as on any boot
    for directory in record.dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(record.conf_path), record.conf, mode=0o600)
    events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record.events_socket)  # a dead owner's: the owner lock is ours
        events.bind(record.events_socket)
        os.chmod(record.events_socket, 0o600)
        withheld = set(record.withheld_env)
        with open_private(Path(record.output_path), "ab") as out:
            proc = subprocess.Popen(
                supervisord_argv(Path(record.conf_path)),
                env={k: v for k, v in environ.items() if k not in withheld},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
    except BaseException:
        events.close()
        raise
    log.info("supervisord started", extra={"fields": {
        "pid": proc.pid, "starts_at_once": list(record.instances), "ahead_of_settings": True}})
    return HeadStart(record, proc, events)


class AdoptedProcess:
    """A head start's supervisord (a subprocess.Popen) seen as the asyncio Process the boot
    keeps: pid, returncode, send_signal(), wait()."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import asyncio

        self._proc = proc
        self.pid = proc.pid
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()

        def wait() -> None:
            code = proc.wait()
            loop.call_soon_threadsafe(lambda: self._exited.done() or self._exited.set_result(code))

        threading.Thread(target=wait, name="supervisord-wait", daemon=True).start()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    async def wait(self) -> int:
        import asyncio

        return await asyncio.shield(self._exited)
