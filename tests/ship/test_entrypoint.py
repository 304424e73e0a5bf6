"""entrypoint.sh run directly (no container engine here): hooks, argument pass-through, the
boot, signals, and the change of user. Real processes, real signals, a real demo node."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess

import psutil
import pytest

from tests.ship.conftest import Site, gone
from tests.ship.recipes import ENTRYPOINT, tool
from tests.support import port_free, wait_until

# Each hook appends its name and whether the demo node had started to boot when it ran.
RECORD = 'echo "$(basename "$0") $([ -e "$DEMO_DIR" ] && echo after || echo before)"'


def test_shellcheck_clean() -> None:
    out = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "--severity=style", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_entrypoint_is_an_executable_bash_script_in_strict_mode() -> None:
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(ENTRYPOINT, os.X_OK)
    assert text.rstrip().endswith('exec comfy-machine "$@"')


def test_demo_boots_after_the_hooks_and_sigterm_stops_everything(site: Site) -> None:
    log = site.workspace / "hooks.log"
    for name in ("2-second.sh", "a-fourth.sh", "B-third.sh", "10-first.sh"):
        site.hook(name, f'{RECORD} >> "$MACHINE_WORKSPACE/hooks.log"\n')
    site.hook("README.txt", "not a hook: only *.sh files run\n")

    run = site.start_demo(DEMO_DIR=str(site.demo))
    site.wait_ready(run)

    # Sorted in the C locale, and every hook ran before the boot began.
    assert log.read_text().splitlines() == [
        "10-first.sh before",
        "2-second.sh before",
        "B-third.sh before",
        "a-fourth.sh before",
    ]
    assert f"running pre-start hook {site.hooks}/10-first.sh" in run.stderr()
    # exec: the entrypoint's process is the agent itself, not a shell waiting for it.
    tree = run.tree()
    assert "comfy-machine" in " ".join(tree[0].cmdline())
    assert len(tree) >= 5, [p.cmdline() for p in tree]  # agent, supervisord, listener, 2 x ComfyUI

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0, run.stderr()[-3000:]
    wait_until(lambda: not gone(tree), 5, "every process of the node's tree gone")
    assert port_free(site.health_port) and port_free(site.port_start)


def test_failing_hook_stops_the_boot_naming_the_hook_and_its_exit_code(site: Site) -> None:
    site.hook("1-ok.sh", 'touch "$MACHINE_WORKSPACE/1-ran"\n')
    failing = site.hook("2-models.sh", 'echo "cannot fetch the models" >&2\nexit 3\n')
    site.hook("3-later.sh", 'touch "$MACHINE_WORKSPACE/3-ran"\n')

    out = site.run("demo", "--workspace", str(site.demo))

    assert out.returncode == 3
    assert "cannot fetch the models" in out.stderr  # the hook's own output is kept
    assert (
        f"pre-start hook {failing} failed with exit code 3; comfy-machine was not started"
        in out.stderr
    )
    assert (site.workspace / "1-ran").exists()
    assert not (site.workspace / "3-ran").exists()
    assert not site.demo.exists()  # nothing was booted
    assert port_free(site.health_port)


def test_sigterm_during_a_hook_stops_it_and_its_children_and_boots_nothing(site: Site) -> None:
    site.hook(
        "1-slow.sh",
        'sleep 300 &\necho $! > "$MACHINE_WORKSPACE/child.pid"\nwait\n',
    )
    run = site.start("demo", "--workspace", str(site.demo))
    pid_file = site.workspace / "child.pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "the hook runs")
    child = psutil.Process(int(pid_file.read_text()))
    hook_procs = run.tree()[1:]
    assert child in hook_procs

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(5) == 128 + signal.SIGTERM
    assert "got SIGTERM during the pre-start hooks" in run.stderr()
    wait_until(lambda: not gone(hook_procs), 5, "the hook and its child gone")
    assert not site.demo.exists()


def test_arguments_pass_through_and_only_boots_run_hooks(site: Site) -> None:
    site.hook("1-fails.sh", "exit 9\n")
    env = {"COMFYUI_CPU_ONLY": "true", "NUM_GPUS": "2"}

    plan = site.run("--log-level", "WARNING", "plan", "--json", **env)
    assert plan.returncode == 0, plan.stderr
    ports = [i["port"] for i in json.loads(plan.stdout)["plan"]["instances"]]
    assert ports == [site.port_start, site.port_start + 1]
    assert "pre-start hook" not in plan.stderr

    # No arguments: `up`, hooks first (here the failing one stops it).
    assert site.run(**env).returncode == 9
    shutil.rmtree(site.hooks)
    up = site.run(NUM_GPUS="abc")
    assert up.returncode == 2
    assert up.stderr.startswith("comfy-machine: invalid settings, nothing was started:")


@pytest.mark.skipif(
    os.geteuid() != 0, reason="changing user needs root: run the tests as root (e.g. in Docker)"
)
def test_as_root_the_workspace_is_given_to_machine_user_and_hooks_run_as_them(
    site: Site,
) -> None:
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user `nobody` here: useradd --system --no-create-home nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: apt-get install util-linux")
    site.root.chmod(0o755)  # short_tmpdir() makes it 0700: the user must get through it
    (site.workspace / "models" / "sub").mkdir(parents=True)
    record = '{ id -u; echo "$HOME"; stat -c %U "$MACHINE_WORKSPACE/models/sub"; }'
    site.hook("1-whoami.sh", f'{record} > "$MACHINE_WORKSPACE/whoami"\nexit 42\n')

    first = site.run("demo", "--workspace", str(site.demo), MACHINE_USER="nobody")
    assert first.returncode == 42, first.stderr
    assert f"giving {site.workspace} to nobody" in first.stderr
    assert (site.workspace / "whoami").read_text().split() == [
        str(user.pw_uid),
        user.pw_dir,
        "nobody",
    ]
    # Warm: the workspace is theirs already, nothing is walked again.
    second = site.run("demo", "--workspace", str(site.demo), MACHINE_USER="nobody")
    assert second.returncode == 42 and "giving" not in second.stderr

    unknown = site.run("plan", MACHINE_USER="no-such-user-here")
    assert unknown.returncode == 1
    assert "MACHINE_USER=no-such-user-here: no such user" in unknown.stderr


def _pid1_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a PID namespace needs root: run the tests as root (e.g. in Docker)"
    if shutil.which("tini") is None or shutil.which("unshare") is None:
        return "tini (the image's PID 1) or unshare is missing: apt-get install tini util-linux"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    )
    if probe.returncode:
        return "unshare cannot make a PID namespace: needs CAP_SYS_ADMIN (Docker: --privileged)"
    return None


@pytest.mark.skipif(_pid1_unavailable() is not None, reason=str(_pid1_unavailable()))
def test_under_tini_as_pid_1_orphans_are_adopted_and_sigterm_exits_0(site: Site) -> None:
    """The image's process tree without a container engine: tini as PID 1 of a new PID
    namespace, entrypoint.sh, the agent."""
    site.hook("1-daemon.sh", "sleep 300 &\n")  # a hook that leaves a daemon behind
    run = site.start(
        argv=[
            "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
            "tini", "--", str(ENTRYPOINT), "demo", "--workspace", str(site.demo),
        ]
    )  # fmt: skip
    site.wait_ready(run)
    (tini,) = psutil.Process(run.proc.pid).children()
    adopted = [" ".join(p.cmdline()) for p in tini.children()]
    assert any("comfy-machine demo" in cmd for cmd in adopted), adopted
    assert "sleep 300" in adopted, adopted  # the orphan is tini's: it reaps it
    tree = [tini, *tini.children(recursive=True)]

    tini.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0, run.stderr()[-3000:]
    wait_until(lambda: not gone(tree), 5, "every process of the namespace gone")
