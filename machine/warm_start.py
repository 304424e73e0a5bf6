"""A warm boot's head start: supervisord and the instances are started before the rest of the
boot is even imported (the health server, the installer, the HTTP clients), since ComfyUI's own
start is what takes long; the boot then verifies the installation while they start. Light to
import on purpose: what this module imports is on the path to the instances' start."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from config.errors import MachineError
from config.git_input import GitAuth, split_userinfo
from config.inputs_digest import inputs_digest
from config.settings import (
    Settings,
    custom_node_auth,
    custom_node_specs,
    input_env_names,
    input_files,
    instance_withheld_env,
)
from services.backoff import policy_from as backoff_policy
from services.fdlimit import raise_fd_limit
from services.install.inputs import (
    LOCK_NAME,
    InstallInputs,
    default_base_python,
    lock_matches,
)
from services.instances import InstanceController
from services.models.extra_paths import write_extra_model_paths
from services.models.options import FetchOptions
from services.plan import NodePlan
from services.proxy.control import write_proxy_config
from services.state import InstanceState, MachineState, ProxyState
from services.supervisor.conf import render_conf
from services.supervisor.head_start import (
    HeadStart,
    Record,
    remove_record,
    write_record,
)

if TYPE_CHECKING:
    from services.gpu.sampler import GpuSampler


def install_inputs(settings: Settings) -> InstallInputs:
    """What the install phase works from (custom nodes resolved from env, TOML, snapshot)."""
    specs, comfyui_ref = custom_node_specs(settings)
    # Credentials in COMFYUI_REPO reach git through its environment only, never the lock.
    comfyui_url, comfyui_userinfo = split_userinfo(settings.comfyui_repo)
    return InstallInputs(
        comfyui_url=comfyui_url,
        comfyui_ref=comfyui_ref,
        install_path=settings.install_path,
        nodes=tuple(specs),
        python=settings.python,
        venv=settings.venv_path,
        base_python=default_base_python(),
        protected=tuple(settings.protected_packages),
        on_conflict=settings.on_conflict,
        install_py_timeout=settings.install_py_timeout,
        workers=settings.install_workers,
        workspace=settings.machine_workspace,
        min_free_bytes=int(settings.install_min_free_gb * 2**30),
        git_timeout=settings.git_timeout,
        git_retries=settings.git_retries,
        comfyui_auth=GitAuth(userinfo=comfyui_userinfo) if comfyui_userinfo else None,
        node_auth=custom_node_auth(settings),
        withheld_env=instance_withheld_env(settings),
        registry_url=settings.comfy_registry_url,
        registry_options=FetchOptions(retries=settings.download_retries),
    )


log = logging.getLogger(__name__)

Launched = tuple[InstanceController, "GpuSampler | None"]


def new_state(settings: Settings, plan: NodePlan) -> MachineState:
    """The node's state before its boot: every planned instance (and the proxy) stopped."""
    state = MachineState(max_queue_depth=settings.max_queue_depth)
    state.proxy = ProxyState(plan=plan.proxy) if plan.proxy is not None else None
    state.instances = {i.gpu: InstanceState(plan=i, proxy=state.proxy) for i in plan.instances}
    return state


def _lock_matches(settings: Settings) -> bool:
    try:
        return lock_matches(install_inputs(settings))
    except MachineError:
        return False  # the boot reports any input it cannot use


def warm_launch(
    settings: Settings, plan: NodePlan, state: MachineState, head: HeadStart | None = None
) -> asyncio.Future[Launched] | None:
    """On a warm boot (the install lock was written for these very inputs), supervisord and
    the instances start now, before anything else the boot does: ComfyUI's own start is the
    long part, and the boot verifies the installation while it runs. ``head``: supervisord
    already started from the last boot's record, kept if this plan would start the very same,
    else stopped first. None when this is no warm boot."""
    if head is not None:
        reason = head_start_mismatch(settings, plan, head.record)
        if reason is None:
            return asyncio.ensure_future(launch(settings, plan, state, True, head))
        log.info("head start stopped", extra={"fields": {"reason": reason}})
        head.stop(plan.policy.stop_timeout + 3.0)
    if not plan.instances or not _lock_matches(settings):
        return None
    # Children inherit the open-files limit: raised before supervisord starts, as on a cold boot.
    raise_fd_limit()
    return asyncio.ensure_future(launch(settings, plan, state, start_now=True))


def _eligible(plan: NodePlan) -> bool:
    # GPU mode: NVML and the self-test come before any instance; a proxy needs its token file.
    return bool(plan.instances) and plan.cpu_only and plan.proxy is None


def head_start_record(
    settings: Settings, plan: NodePlan, digest: str | None = None
) -> Record | None:
    """What the next boot needs to start supervisord before reading its settings (see
    services/supervisor/head_start.py), with the digest of the inputs as they are now unless
    ``digest`` is given; None where a head start does not apply."""
    if not _eligible(plan):
        return None
    env_names = input_env_names()
    files = [*input_files(settings), str(settings.machine_workspace / LOCK_NAME)]
    return Record(
        digest=digest or inputs_digest(os.environ, env_names, files),
        env_names=tuple(env_names),
        files=tuple(files),
        workspace=str(plan.workspace),
        conf_path=str(plan.supervisor_conf),
        pidfile=str(plan.supervisor_pidfile),
        conf=render_conf(plan, [inst.name for inst in plan.instances]),
        instances=tuple(inst.name for inst in plan.instances),
        output_path=str(plan.supervisor_output),
        events_socket=str(plan.events_socket),
        ports=tuple((inst.listen, inst.port) for inst in plan.instances),
        withheld_env=plan.withheld_env,
        dirs=tuple(str(d) for d in plan.instance_dirs),
        extra_model_paths=str(plan.extra_model_paths) if plan.extra_model_paths else None,
        extra_model_paths_yaml=plan.extra_model_paths_yaml,
    )


def leave_head_start(settings: Settings, plan: NodePlan) -> None:
    """After the installation was verified: the record the next boot starts from (or none).
    It only makes the next boot faster: a record that cannot be written (a full disk) is no
    reason to fail this one, and none is left (a stale one would only be stopped again)."""
    record = head_start_record(settings, plan)
    try:
        if record is None:
            remove_record(plan.workspace)
        else:
            write_record(record)
    except OSError as exc:
        log.warning("head-start record not written; the next boot starts without it",
                    extra={"fields": {"error": str(exc)}})
        remove_record(plan.workspace)


def head_start_mismatch(settings: Settings, plan: NodePlan, record: Record) -> str | None:
    """Why what a head start launched is not what this boot would launch; None when it is."""
    expected = head_start_record(settings, plan, record.digest)
    if expected is None:
        return "GPU mode, a proxy or no instance: no head start applies"
    if dataclasses.replace(expected, env_names=record.env_names, files=record.files) != record:
        return "the settings give another supervisord.conf, environment or model paths"
    if not _lock_matches(settings):
        return "the installation's lock does not match the settings"
    return None


async def stop_launched(
    controller: InstanceController | None, launched: asyncio.Future[Launched] | None
) -> None:
    """Stop what the boot started: its controller, or the warm launch's (cancelled if it is
    still under way: what it started, it stops itself)."""
    if controller is None and launched is not None:
        launched.cancel()
        await asyncio.wait({launched})
        if launched.cancelled() or launched.exception() is not None:
            return
        controller, _ = launched.result()
    if controller is not None:
        await controller.stop()


async def launch(
    settings: Settings,
    plan: NodePlan,
    state: MachineState,
    start_now: bool,
    head: HeadStart | None = None,
) -> Launched:
    """supervisord, and with ``start_now`` every instance (its port free, its GPU not
    quarantined) started by supervisord itself (call attach() later); else the reconcile loop
    starts them. GPU mode: NVML and the sentinel self-test (cached per GPU and driver) come
    first: no instance starts on a failing GPU."""
    for directory in plan.instance_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    if start_now:  # ComfyUI reads it once, at its start
        write_extra_model_paths(plan.extra_model_paths, plan.extra_model_paths_yaml,
                                settings.models_path)
    sampler = None
    if not plan.cpu_only:  # NVML and the self-test: GPU mode alone loads them
        from services.gpu.guard import prepare_gpus

        sampler = await prepare_gpus(settings, plan, state)
    if plan.proxy is not None and settings.comfyui_access_token is not None:
        # The token goes into the proxy's config file (0600), never into a command line.
        write_proxy_config(plan.proxy, settings.comfyui_access_token)
    controller = InstanceController(plan, state, settings.probe_interval, backoff_policy(settings))
    if sampler is not None:
        sampler.quarantine = controller.quarantine
    try:
        await controller.launch(start_now, head)
        if not start_now:
            await controller.attach()
    except (Exception, asyncio.CancelledError):
        # Whatever got started (supervisord, the event socket) must not outlive the boot.
        await asyncio.shield(controller.stop())
        raise
    return controller, sampler


