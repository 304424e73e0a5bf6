"""What an operator may do to a running node (health's token-guarded POST routes call these):
restart an instance, drain and undrain it, run its GPU's self-test again and lift the
quarantine when it passes. Each answer is (HTTP status, JSON body)."""

from __future__ import annotations

import logging
from typing import Any

from config.errors import SupervisorError
from config.settings import Settings
from services.gpu.guard import selftest_instance
from services.instances import InstanceController
from services.plan import NodePlan
from services.state import GpuStatus, InstanceState, MachineState, Phase

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any]]


def _body(action: str, inst: InstanceState, ok: bool, message: str, **extra: Any) -> dict:
    return {"action": action, "gpu": inst.plan.gpu, "name": inst.plan.name, "ok": ok,
            "message": message, **extra}


def nvml_healthy(status: GpuStatus | None) -> tuple[bool, str]:
    """Whether NVML's latest samples find the GPU healthy (no NVML in CPU mode: yes)."""
    if status is None:
        return True, "no NVML (CPU mode)"
    if status.lost:
        return False, f"NVML lost the GPU: {status.lost}"
    if status.unhealthy_samples:
        why = "; ".join(status.warnings) or "unhealthy"
        return False, f"NVML's last {status.unhealthy_samples} sample(s) were unhealthy: {why}"
    return True, "NVML finds it healthy"


class OperatorActions:
    """Bound to the node's state at start; the controller joins once instances run."""

    def __init__(self, settings: Settings, plan: NodePlan, state: MachineState) -> None:
        self.settings = settings
        self.plan = plan
        self.state = state
        self.controller: InstanceController | None = None

    def _unavailable(self, action: str, inst: InstanceState) -> Answer | None:
        if self.state.phase is Phase.STOPPING or self.state.draining:
            return 409, _body(action, inst, False, "the node is stopping")
        if self.controller is None:
            return 409, _body(action, inst, False, f"the node is not running instances yet "
                              f"(phase {self.state.phase.value}); try again once it is")
        return None

    async def restart(self, gpu: int) -> Answer:
        inst = self.state.instances[gpu]
        if (refused := self._unavailable("restart", inst)) is not None:
            return refused
        assert self.controller is not None
        if inst.quarantined:
            return 409, _body("restart", inst, False, f"{inst.quarantined}; lift it with "
                              f"POST /health/comfyui/gpus/{gpu}/retest")
        try:
            await self.controller.restart(inst)
        except SupervisorError as exc:
            return 502, _body("restart", inst, False, f"supervisord refused: {exc}")
        return 200, _body("restart", inst, True, f"{inst.plan.name} restarted",
                          state=inst.process_state.name, pid=inst.pid)

    async def drain(self, gpu: int) -> Answer:
        inst = self.state.instances[gpu]
        return self._set_draining("drain", inst, True) or (
            200, _body("drain", inst, True, f"{inst.plan.name} accepts no new work; the prompts "
                       "it has finish", queue_running=inst.queue_running,
                       queue_pending=inst.queue_pending))

    async def undrain(self, gpu: int) -> Answer:
        inst = self.state.instances[gpu]
        return self._set_draining("undrain", inst, False) or (
            200, _body("undrain", inst, True, f"{inst.plan.name} accepts work again once it is "
                       "ready"))

    def _set_draining(self, action: str, inst: InstanceState, draining: bool) -> Answer | None:
        """Mark ``inst`` (un)draining; the refusal to answer instead, if the node cannot."""
        refused = self._unavailable(action, inst)
        if refused is None:
            inst.draining = draining
            self.state.changed()
        return refused

    async def retest(self, gpu: int) -> Answer:
        """The sentinel self-test again (never the cached pass); the quarantine is lifted
        when it passes and NVML finds the GPU healthy."""
        inst = self.state.instances[gpu]
        if (refused := self._unavailable("retest", inst)) is not None:
            return refused
        assert self.controller is not None
        status = next((g for g in self.state.gpus.values() if g.uuid == inst.plan.gpu_uuid), None)
        driver = status.driver_version if status else "cpu"
        result = await selftest_instance(self.settings, self.plan, inst, driver, use_cache=False)
        if status is not None:
            status.selftest = {**result.report, "cached": False}
            self.state.changed()
        healthy, nvml_words = nvml_healthy(status)
        was = inst.quarantined
        lifted = bool(was) and result.ok and healthy
        if lifted:
            self.controller.lift_quarantine(inst)
        if not result.ok:
            message = result.reason
        elif not healthy:
            message = f"self-test passed, but {nvml_words}: the quarantine stays"
        elif lifted:
            message = "self-test passed and NVML finds it healthy: quarantine lifted"
        else:
            message = "self-test passed (the GPU was not quarantined)"
        return (200 if result.ok else 422), _body(
            "retest", inst, result.ok and healthy, message, selftest_ok=result.ok,
            nvml_healthy=healthy, quarantined=inst.quarantined, lifted=lifted,
            report=result.report,
        )
