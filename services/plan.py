"""The node plan: a pure function of settings and the GPU list (no I/O, nothing started)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from config.errors import ConfigError, Problem
from config.settings import Settings, check_ports, instance_withheld_env
from services.gpu.interface import Gpu, cpu_slots
from services.models.extra_paths import render_extra_model_paths

PROGRAM_PREFIX = "comfyui-gpu"
# One supervisord group for every instance: a group stops its programs in parallel, groups
# stop one after another (~1.7 s each for ComfyUI).
INSTANCE_GROUP = "comfyui"
EVENT_LISTENER = "comfy-machine-events"
# The authenticating proxy (COMFYUI_EXPOSE=proxy): one Caddy for every instance's public port.
PROXY_PROGRAM = "comfyui-proxy"
# With the proxy, instances listen here only: nothing but the proxy (and the agent) reaches them.
PROXY_UPSTREAM_HOST = "127.0.0.1"


@dataclass(frozen=True)
class InstancePlan:
    """One ComfyUI instance: its GPU, port, command line and environment.

    ``gpu`` is the GPU's NVML index (nvidia-smi's numbering; 0..N-1 in CPU mode), and the one
    number users see: the name ``comfyui-gpu{gpu}``, the port COMFYUI_PORT_START + gpu, the key
    of ``MachineState.instances``, ``/health/comfyui/instances/{gpu}``, the ``gpu`` label."""

    gpu: int
    name: str
    gpu_uuid: str
    gpu_name: str
    port: int
    listen: str
    url: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)
    cwd: Path
    log_path: Path
    # COMFYUI_EXPOSE=proxy: the public port (COMFYUI_PORT_START + gpu) the proxy serves this
    # instance on, and its URL; ``port``/``url`` are then the instance's own, on 127.0.0.1.
    public_port: int | None = None
    public_url: str | None = None


@dataclass(frozen=True)
class ProxyRoute:
    """One public port of the proxy and the instance behind it."""

    gpu: int
    public_port: int
    upstream: str  # host:port of the instance (127.0.0.1)


@dataclass(frozen=True)
class ProxyPlan:
    """Caddy in front of the instances: one supervised program serving every public port,
    configured by a generated file that holds the access token (never on the plan itself)."""

    name: str
    binary: str
    config_path: Path  # written 0600 in the 0700 run directory at each boot
    home: Path  # Caddy's HOME and XDG directories: nothing of it lands elsewhere
    listen: str  # COMFYUI_PUBLIC_LISTEN
    routes: tuple[ProxyRoute, ...]
    log_path: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def argv(self) -> tuple[str, ...]:
        # Only the config file's path: the token never appears in a command line.
        return (self.binary, "run", "--config", str(self.config_path))

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "data"),
        }

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(route.public_port for route in self.routes)

    def url(self, port: int) -> str:
        """A public port's URL as reached on this host (a wildcard address through loopback)."""
        return f"{self.scheme}://{_url_host(self.listen)}:{port}"


@dataclass(frozen=True)
class ProgramPolicy:
    """How supervisord starts, restarts, stops and logs every instance."""

    startsecs: int
    start_retries: int
    stop_timeout: int
    log_max_bytes: int
    log_backups: int


@dataclass(frozen=True)
class NodePlan:
    """Everything the agent will write and start, decided before anything runs."""

    workspace: Path
    run_dir: Path
    log_dir: Path
    output_dir: Path
    input_dir: Path
    install_path: Path
    python: Path
    supervisor_socket: Path
    supervisor_conf: Path
    events_socket: Path
    health_listen: str
    health_port: int
    cpu_only: bool
    agent_python: str
    policy: ProgramPolicy
    instances: tuple[InstancePlan, ...]
    # The one model store and the yaml every instance reads it through (written before start).
    models_path: Path | None = None
    extra_model_paths: Path | None = None
    extra_model_paths_yaml: str = ""
    # Secrets of the agent's environment the instances do not inherit (INSTANCE_PASS_ENV).
    withheld_env: tuple[str, ...] = ()
    # COMFYUI_EXPOSE=proxy: the authenticating proxy in front of the instances.
    proxy: ProxyPlan | None = None

    @property
    def group(self) -> str:
        return INSTANCE_GROUP

    @property
    def supervisor_pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def supervisor_output(self) -> Path:
        """supervisord's own stdout and stderr (what it prints before its log is open)."""
        return self.log_dir / "supervisord.out"

    @property
    def instance_dirs(self) -> tuple[Path, Path]:
        """The directories every ComfyUI run is pointed at (``--output/--input-directory``):
        they must exist before it starts, or its nodes that read them fail to import."""
        return self.output_dir, self.input_dir

    def inherited_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """What supervisord (and through it every instance) gets of the agent's ``environ``."""
        return {k: v for k, v in environ.items() if k not in self.withheld_env}

    def instance(self, gpu: int) -> InstancePlan | None:
        return next((i for i in self.instances if i.gpu == gpu), None)


def select_gpus(settings: Settings, found: list[Gpu]) -> list[Gpu]:
    """The GPUs to run on: all found, the first NUM_GPUS, or those COMFYUI_GPUS names; CPU mode
    makes NUM_GPUS slots numbered 0..N-1."""
    if not settings.enable_comfyui:
        return []
    if settings.comfyui_cpu_only:
        return cpu_slots(settings.num_gpus or 1)
    if settings.comfyui_gpus.strip():
        return pick_gpus(settings, found)
    wanted = settings.num_gpus if settings.num_gpus is not None else len(found)
    if wanted > len(found):
        listing = ", ".join(f"{g.index}: {g.name}" for g in found) or "none"
        raise ConfigError(
            [
                Problem(
                    "NUM_GPUS",
                    str(wanted),
                    f"only {len(found)} GPU(s) found ({listing}); set NUM_GPUS <= {len(found)} "
                    "or unset it to use every GPU found",
                )
            ]
        )
    if wanted == 0:
        raise ConfigError(
            [
                Problem(
                    "NUM_GPUS",
                    "unset",
                    "no GPU was found; check `nvidia-smi` and the container's GPU access, or set "
                    "COMFYUI_CPU_ONLY=true for development without a GPU",
                )
            ]
        )
    return found[:wanted]


def pick_gpus(settings: Settings, found: list[Gpu]) -> list[Gpu]:
    """COMFYUI_GPUS: an explicit list of indices or UUIDs, in the order given."""
    listing = ", ".join(f"{g.index}: {g.uuid} ({g.name})" for g in found) or "none"
    picked: list[Gpu] = []
    problems = []
    for item in (part.strip() for part in settings.comfyui_gpus.split(",")):
        if not item:
            continue
        match = next(
            (g for g in found if (str(g.index) == item if item.isdigit() else g.uuid == item)),
            None,
        )
        if match is None:
            problems.append(f"{item!r} is not a GPU found here ({listing})")
        elif match in picked:
            problems.append(f"{item!r} is listed twice; each GPU runs one instance")
        else:
            picked.append(match)
    if not problems and settings.num_gpus is not None and settings.num_gpus != len(picked):
        problems.append(f"names {len(picked)} GPU(s) but NUM_GPUS={settings.num_gpus}; unset one")
    if problems:
        raise ConfigError(
            [Problem("COMFYUI_GPUS", repr(settings.comfyui_gpus), p) for p in problems]
        )
    return picked


def _url_host(listen: str) -> str:
    # An instance listening on every address is reached locally through loopback.
    if listen in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{listen}]" if ":" in listen else listen


# The kernel limits a unix socket path (sun_path) to 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


def make_plan(
    settings: Settings,
    found: list[Gpu],
    agent_python: str = sys.executable,
    caddy: str = "caddy",
) -> NodePlan:
    """Decide instances, ports, argv, env and paths; raises ConfigError for an impossible layout.
    ``caddy`` is the proxy's binary (COMFYUI_EXPOSE=proxy), found by the caller."""
    gpus = select_gpus(settings, found)
    node = node_plan(settings, agent_python)
    check_layout(settings, gpus, node)
    instances = tuple(instance_plan(settings, node, gpu) for gpu in gpus)
    proxy = proxy_plan(settings, node, instances, caddy)
    return replace(node, instances=instances, proxy=proxy)


def proxy_plan(
    settings: Settings, node: NodePlan, instances: tuple[InstancePlan, ...], caddy: str
) -> ProxyPlan | None:
    """The proxy serving each instance's public port, or None (COMFYUI_EXPOSE=none, or no
    instance to serve)."""
    if settings.comfyui_expose != "proxy" or not instances:
        return None
    routes = tuple(
        ProxyRoute(inst.gpu, inst.public_port or 0, f"{PROXY_UPSTREAM_HOST}:{inst.port}")
        for inst in instances
    )
    return ProxyPlan(
        name=PROXY_PROGRAM,
        binary=caddy,
        config_path=node.run_dir / "caddy.json",
        home=node.run_dir / "caddy",
        listen=settings.comfyui_public_listen,
        routes=routes,
        log_path=node.log_dir / f"{PROXY_PROGRAM}.log",
        tls_cert=settings.comfyui_tls_cert,
        tls_key=settings.comfyui_tls_key,
    )


def check_layout(settings: Settings, gpus: list[Gpu], node: NodePlan) -> None:
    """The instance ports (COMFYUI_PORT_START + GPU index) and the workspace's unix socket
    paths must be possible; raises ConfigError naming every problem."""
    problems = check_ports(settings, [g.index for g in gpus])
    if len(str(node.supervisor_socket).encode()) > MAX_SOCKET_PATH:
        problems.append(
            Problem(
                "MACHINE_WORKSPACE",
                str(node.workspace),
                f"too long for the unix sockets under it (at most {MAX_SOCKET_PATH - 20} "
                "bytes); use a shorter path",
            )
        )
    if problems:
        raise ConfigError(problems)


def node_plan(settings: Settings, agent_python: str) -> NodePlan:
    """The node without its instances: workspace paths, sockets, supervisord's program
    policy, the health server, the model store."""
    workspace = settings.machine_workspace
    run_dir = workspace / "run"
    return NodePlan(
        workspace=workspace,
        run_dir=run_dir,
        log_dir=workspace / "logs",
        output_dir=workspace / "output",
        input_dir=workspace / "input",
        install_path=settings.install_path,
        python=settings.python,
        supervisor_socket=run_dir / "supervisor.sock",
        supervisor_conf=run_dir / "supervisord.conf",
        events_socket=run_dir / "events.sock",
        health_listen=settings.machine_health_listen,
        health_port=settings.machine_health_port,
        cpu_only=settings.comfyui_cpu_only,
        agent_python=agent_python,
        policy=ProgramPolicy(
            startsecs=settings.instance_startsecs,
            start_retries=settings.instance_start_retries,
            stop_timeout=settings.instance_stop_timeout,
            log_max_bytes=settings.instance_log_max_bytes,
            log_backups=settings.instance_log_backups,
        ),
        instances=(),
        models_path=settings.models_path,
        extra_model_paths=run_dir / "extra_model_paths.yaml",
        extra_model_paths_yaml=render_extra_model_paths(
            settings.models_path, (m.folder for m in settings.models)
        ),
        withheld_env=tuple(sorted(instance_withheld_env(settings))),
    )


def instance_plan(settings: Settings, node: NodePlan, gpu: Gpu) -> InstancePlan:
    """The instance on ``gpu``: named and ported by its index, bound to it by UUID. Behind the
    proxy it listens on 127.0.0.1 at its internal port and the proxy serves its public one."""
    public_port = settings.comfyui_port_start + gpu.index
    name = f"{PROGRAM_PREFIX}{gpu.index}"
    public_url = None
    if settings.comfyui_expose == "proxy":
        listen, port = PROXY_UPSTREAM_HOST, settings.comfyui_internal_port_start + gpu.index
        scheme = "https" if settings.comfyui_tls_cert is not None else "http"
        public_url = f"{scheme}://{_url_host(settings.comfyui_public_listen)}:{public_port}"
    else:
        listen, port = settings.comfyui_listen, public_port
    argv = (
        str(settings.python),
        "main.py",
        "--listen",
        listen,
        "--port",
        str(port),
        "--output-directory",
        str(node.output_dir),
        "--input-directory",
        str(node.input_dir),
        "--disable-auto-launch",
        "--extra-model-paths-config",
        str(node.extra_model_paths),
        *(("--cpu",) if gpu.is_cpu else ()),
        *shlex.split(settings.comfyui_args),
    )
    env = {
        # CPU mode hides every GPU; GPU mode binds by UUID so indices cannot drift.
        "CUDA_VISIBLE_DEVICES": "" if gpu.is_cpu else gpu.uuid,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "PYTHONUNBUFFERED": "1",
    }
    return InstancePlan(
        gpu=gpu.index,
        name=name,
        gpu_uuid=gpu.uuid,
        gpu_name=gpu.name,
        port=port,
        listen=listen,
        url=f"http://{_url_host(listen)}:{port}",
        argv=argv,
        env=env,
        cwd=settings.install_path,
        log_path=node.log_dir / f"{name}.log",
        public_port=public_port if public_url else None,
        public_url=public_url,
    )
