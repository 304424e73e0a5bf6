"""The prober's loop (services/probes.py): every live process is followed, including one that
looked gone for a moment (supervisord's answers and its events race: a late event of the
previous process can name the old pid for a moment). Left unfollowed, such an instance would
stay "starting" forever, with nothing probing it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from services.probes import InstanceProber, ProbeSettings, ProcessGone
from services.state import InstanceState, MachineState
from services.supervisor.states import ProcessState
from tests.unit.test_checks import instance


async def test_a_process_that_looked_gone_and_lives_is_followed_again() -> None:
    state = MachineState()
    inst = instance(0)
    state.instances = {0: inst}
    inst.process_state, inst.pid = ProcessState.STARTING, 200
    followed: list[int] = []
    again = asyncio.Event()

    async def follow(pid: int) -> None:
        followed.append(pid)
        if len(followed) == 1:
            # A late EXITED of the predecessor: the old pid, then the current one again.
            inst.pid, inst.pid_exited = 100, True
            state.changed()
            await asyncio.sleep(0)
            inst.pid, inst.pid_exited = 200, False
            state.changed()
            raise ProcessGone
        again.set()
        await asyncio.Event().wait()

    async with aiohttp.ClientSession() as session:
        prober = InstanceProber(state, inst, session, ProbeSettings(30.0, 1.0, 1.0), Path("/x"))
        prober._follow = follow  # type: ignore[method-assign]
        task = asyncio.create_task(prober.run())
        try:
            await asyncio.wait_for(again.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert followed == [200, 200]


async def test_a_late_exit_of_the_predecessor_leaves_its_live_successor_alone(
    tmp_path: Path,
) -> None:
    from config.settings import load_settings
    from services.instances import InstanceController
    from services.plan import make_plan
    from services.supervisor.events import ProcessEvent

    settings = load_settings({"MACHINE_WORKSPACE": str(tmp_path), "COMFYUI_CPU_ONLY": "true"})
    plan = make_plan(settings, [], "/agent/python")
    state = MachineState()
    inst = InstanceState(plan=plan.instances[0])
    state.instances = {0: inst}
    controller = InstanceController(plan, state, 30.0)
    name = plan.instances[0].name
    # supervisord restarted it and a refresh already adopted the new process (pid 200)...
    inst.process_state, inst.pid = ProcessState.STARTING, 200
    # ...when the old one's exit (pid 100) arrives.
    controller._on_event(ProcessEvent(1, name, ProcessState.EXITED, ProcessState.RUNNING, 100,
                                      False))
    assert inst.pid == 200 and inst.process_alive
    # The successor's own exit is one.
    controller._on_event(ProcessEvent(2, name, ProcessState.EXITED, ProcessState.STARTING, 200,
                                      False))
    assert inst.pid == 200 and not inst.process_alive
    await controller.stop()


def test_only_an_exit_of_another_pid_while_the_adopted_one_lives_is_late() -> None:
    inst = instance(0)
    inst.process_state, inst.pid = ProcessState.STARTING, 200
    assert inst.late_exit(ProcessState.EXITED, 100)
    assert inst.late_exit(ProcessState.BACKOFF, 100)
    assert not inst.late_exit(ProcessState.EXITED, 200)  # its own exit
    assert not inst.late_exit(ProcessState.RUNNING, 100)  # not an exit
    assert not inst.late_exit(ProcessState.EXITED, None)
    inst.pid_exited = True  # the adopted one is dead too: the event is news
    assert not inst.late_exit(ProcessState.EXITED, 100)
