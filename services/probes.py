"""Per-instance probing: wait for HTTP while the process lives, run the smoke prompt, then
probe /system_stats and /queue periodically. Results go into MachineState only. The queue
figures come live from the process's websocket (services/queue_feed.py) while that is up; the
periodic probe is their fallback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from pydantic import SecretStr

from services import disk
from services.comfyui import (
    PNG_SIGNATURE,
    ComfyApiError,
    ComfyClient,
    history_error,
    remove_saved,
    saved_image,
)
from services.import_check import modules_loaded, parse_startup_log
from services.logfile import read_end
from services.models.instance_check import check_instance
from services.queue_feed import QueueFeed, start_feed, stop_feed
from services.state import (
    InstanceState,
    MachineState,
    NodeStatus,
    ProbeResult,
    SmokeResult,
    SmokeStatus,
)

log = logging.getLogger(__name__)

SMOKE_SUBFOLDER = "comfy-machine-smoke"
# While an instance boots, poll fast so readiness follows the first answer closely (a refused
# local connection costs microseconds); the smoke prompt's history likewise (issue 14: a warm
# boot's overhead over ComfyUI's own start).
STARTUP_POLL_S = 0.025
HISTORY_POLL_S = 0.02
# How long a smoke waits for its files to be removed (a stalled disk must not hold it).
SMOKE_CLEANUP_WAIT_S = 1.0


def smoke_prompt(prefix: str) -> dict:
    """A workflow that needs no model: EmptyImage -> SaveImage (64x64)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": prefix, "images": ["1", 0]},
        },
    }


@dataclass(frozen=True)
class ProbeSettings:
    interval: float
    timeout: float
    smoke_timeout: float
    # COMFYUI_EXPOSE=proxy: the token the smoke prompt through the proxy carries.
    access_token: SecretStr | None = None


class ProcessGone(Exception):
    """The process being probed exited or was replaced."""


class InstanceProber:
    """Drives one instance's readiness facts (probe, smoke, queue) for each new pid."""

    def __init__(
        self,
        state: MachineState,
        inst: InstanceState,
        session: aiohttp.ClientSession,
        settings: ProbeSettings,
        output_dir: Path,
    ) -> None:
        self._state = state
        self._inst = inst
        self._settings = settings
        self._output_dir = output_dir
        self._session = session
        self._client = ComfyClient(session, inst.plan.url, settings.timeout)
        # The websocket follower of the current process (services/queue_feed.py): while it is
        # live, the queue figures are its, within milliseconds of each change.
        self._feed: QueueFeed | None = None
        self._smoke_blocked_by_disk = False
        # The proxy process the last smoke prompt through it was sent to (tried once each).
        self._public_tried: tuple[int, int | None] | None = None

    def _alive(self, pid: int) -> bool:
        return self._inst.pid == pid and self._inst.process_alive

    def _check(self, pid: int) -> None:
        if not self._alive(pid):
            raise ProcessGone

    async def run(self) -> None:
        """Forever: wait for a live process, then probe it until it is gone. A process that
        looked gone and is alive again (a late event of its predecessor briefly named the old
        pid: supervisord's answers and its events race) is followed again, never left
        unprobed."""
        while True:
            inst = self._inst
            if inst.pid is None or not self._alive(inst.pid):
                await self._state.wait_changed(self._settings.interval)
                continue
            with contextlib.suppress(ProcessGone):
                await self._follow(inst.pid)

    async def _follow(self, pid: int) -> None:
        await self._wait_for_http(pid)
        self._feed, feed_task = start_feed(
            self._state, self._inst, pid, self._session, self._client, self._settings.timeout
        )
        try:
            await self._follow_answering(pid)
        finally:
            self._feed = None
            await stop_feed(feed_task)

    async def _follow_answering(self, pid: int) -> None:
        # ComfyUI ends its first prompt with a full gc.collect() that holds the GIL (~0.3 s for
        # real ComfyUI with torch loaded), and every request it gets meanwhile waits: the model
        # check's few requests go first, the smoke prompt's end is seen on disk (issue 14).
        alive = lambda: self._alive(pid)  # noqa: E731
        await check_instance(self._state, self._inst, self._client, alive)
        # The import check runs while the smoke prompt does; the smoke's result is recorded
        # only once the imports are, so health never says ready between a passed smoke prompt
        # and a found import failure.
        imports = asyncio.ensure_future(self._check_imports(pid))
        try:
            await self._smoke(pid, imports_checked=imports)
        finally:
            imports.cancel()  # done by now, unless the smoke ended by the process going
            await asyncio.gather(imports, return_exceptions=True)
        # A smoke prompt that failed because the workspace disk was full (SaveImage could not
        # write) says nothing about the instance: run it again once the disk has space.
        while self._smoke_blocked_by_disk:
            await self._sleep_while_alive(pid, self._settings.interval)
            if not disk.is_full(self._output_dir):
                await self._smoke(pid)
        await self._public_smoke_when_due(pid)
        while True:
            await self._sleep_while_alive(pid, self._settings.interval)
            if await self._probe(pid):  # re-checks models only when one was verified since
                await check_instance(self._state, self._inst, self._client, alive)
            await self._public_smoke_when_due(pid)

    async def _sleep_while_alive(self, pid: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._check(pid)
            await self._state.wait_changed(remaining)
        self._check(pid)

    async def _probe(self, pid: int, starting: bool = False) -> bool:
        """One probe of /system_stats and /queue, recorded in the state. ``starting``: the
        process has not answered yet."""
        start = time.monotonic()
        # While the websocket feed is live its queue figures are newer: /queue is not asked
        # (half the requests of an idle node's probes: issue 14's idle CPU).
        live = self._feed is not None and self._feed.live
        try:
            await self._client.system_stats()
            depth = None if live else await self._client.queue()
        except (aiohttp.ClientError, TimeoutError, ComfyApiError, KeyError, ValueError) as exc:
            self._check(pid)
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            before = self._inst.last_probe
            self._inst.last_probe = ProbeResult(time.time(), False, time.monotonic() - start, error)
            self._inst.probe_failures += 1
            # A starting process refuses the poll the same way 40 times a second: only a new
            # error is news to the waiters (answers show the rest within their TTL).
            if not starting or before is None or before.ok or before.error != error:
                self._state.changed()
            return False
        self._check(pid)
        inst = self._inst
        before = (inst.last_probe is not None and inst.last_probe.ok, inst.probe_failures,
                  inst.queue_running, inst.queue_pending)
        inst.last_probe = ProbeResult(time.time(), True, time.monotonic() - start)
        inst.probe_failures = 0
        if depth is not None:
            inst.queue_running, inst.queue_pending = depth.running, depth.pending
        # A routine probe (ok again, the same queue) changes only its timestamp and latency,
        # which answers show within their TTL: waking every waiter for it would cost an idle
        # node a wake-up storm per probe.
        if before != (True, 0, inst.queue_running, inst.queue_pending):
            self._state.changed()
        return True

    async def _wait_for_http(self, pid: int) -> None:
        # No start-up timeout: a live process may take minutes (cold caches, big node packs);
        # a dead one is noticed the moment supervisord or the pidfd says so.
        while not await self._probe(pid, starting=True):
            await self._sleep_while_alive(pid, STARTUP_POLL_S)
        # Start-up failures before the first answer are not failures of a running instance.
        log.info(
            "instance answering", extra={"fields": {"instance": self._inst.plan.name, "pid": pid}}
        )

    async def _smoke(
        self,
        pid: int,
        client: ComfyClient | None = None,
        imports_checked: asyncio.Future[None] | None = None,
    ) -> None:
        """The smoke prompt, straight to the instance or (``client``) through the proxy; its
        result recorded once ``imports_checked`` is done."""
        inst = self._inst
        public = client is not None
        client = client or self._client
        started = time.monotonic()
        result = SmokeResult(pid=pid, status=SmokeStatus.RUNNING, started_at=time.time())
        if public:
            inst.public_smoke = result
        else:
            inst.smoke = result
        self._state.changed()
        # A file name of its own each time: the same prompt twice would be answered from
        # ComfyUI's cache, naming the first run's image (removed by then), and only this run
        # can have written a file of that name.
        stem = f"{inst.plan.name}{'-proxy' if public else ''}-{uuid.uuid4().hex[:12]}"
        try:
            prompt_id = await client.post_prompt(
                smoke_prompt(f"{SMOKE_SUBFOLDER}/{stem}"), f"comfy-machine-{uuid.uuid4()}"
            )
            result.prompt_id = prompt_id
            try:
                if public:  # through the proxy, the image must come back through it too
                    await self._await_history(pid, prompt_id, started, client)
                else:
                    await self._await_smoke(pid, prompt_id, started, stem)
            finally:
                await self._remove_smoke_files(stem)
        except (aiohttp.ClientError, TimeoutError, ComfyApiError, KeyError, ValueError) as exc:
            self._check(pid)
            if not public:
                self._smoke_blocked_by_disk = disk.is_full(self._output_dir)
            if imports_checked is not None:
                await imports_checked
            self._finish_smoke(started, f"{type(exc).__name__}: {exc}", result)
            return
        if not public:
            self._smoke_blocked_by_disk = False
        if imports_checked is not None:
            await imports_checked
        self._finish_smoke(started, None, result)

    async def _public_smoke_when_due(self, pid: int) -> None:
        """COMFYUI_EXPOSE=proxy: once per process, the smoke prompt through the proxy's public
        port with the token, which proves the way users come in (tried again when the proxy
        restarts, should it fail). Waits for nothing: the next probe pass tries again."""
        proxy, url = self._inst.proxy, self._inst.plan.public_url
        token = self._settings.access_token
        if proxy is None or token is None or url is None or not proxy.serving:
            return
        own = self._inst.smoke  # the instance itself must work first
        if own is None or own.pid != pid or own.status is not SmokeStatus.PASSED:
            return
        done = self._inst.public_smoke
        if done is not None and done.pid == pid and done.status is SmokeStatus.PASSED:
            return
        if self._public_tried == (pid, proxy.pid):
            return
        self._public_tried = (pid, proxy.pid)
        # Our own proxy on this host: its certificate is not checked (it may be self-signed, or
        # name a host this address is not), the token still travels inside TLS.
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token.get_secret_value()}"},
            connector=aiohttp.TCPConnector(ssl=False),
        ) as session:
            await self._smoke(pid, ComfyClient(session, url, self._settings.timeout))

    async def _await_smoke(self, pid: int, prompt_id: str, started: float, stem: str) -> None:
        """Done when SaveImage's whole PNG is on disk, or when /history says how it ended.
        The file comes first: ComfyUI's first prompt ends in a GIL-holding gc.collect()
        (~0.3 s) that every request, /history's too, waits behind. The history decides when
        the file never comes: an error, or an output folder other than the one we know."""
        history = asyncio.ensure_future(self._await_history(pid, prompt_id, started, self._client))
        folder = self._output_dir / SMOKE_SUBFOLDER
        try:
            while True:
                self._check(pid)
                # Raced with the history: a look that hangs (a stalled disk) ends with it, by
                # SMOKE_TIMEOUT at the latest.
                look = asyncio.ensure_future(asyncio.to_thread(saved_image, folder, stem))
                await asyncio.wait({look, history}, return_when=asyncio.FIRST_COMPLETED)
                if look.done() and look.result() is not None:
                    return
                if history.done():
                    history.result()
                    return
                await asyncio.wait({history}, timeout=HISTORY_POLL_S)
        finally:
            history.cancel()
            await asyncio.gather(history, return_exceptions=True)

    async def _remove_smoke_files(self, stem: str) -> None:
        """Smoke images are ours, not the user's: the image, or what a failed write (a full
        disk) left, goes from the shared output folder (in a thread, waited for a bounded
        time: a stalled disk must not hold the smoke)."""
        folder = self._output_dir / SMOKE_SUBFOLDER
        removed = asyncio.ensure_future(asyncio.to_thread(remove_saved, folder, stem))
        await asyncio.wait({removed}, timeout=SMOKE_CLEANUP_WAIT_S)

    async def _await_history(
        self, pid: int, prompt_id: str, started: float, client: ComfyClient
    ) -> None:
        deadline = started + self._settings.smoke_timeout
        while True:
            self._check(pid)
            entry = await client.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed"):
                break
            if entry is not None and entry.get("status", {}).get("status_str") == "error":
                raise ComfyApiError(history_error(entry))
            if time.monotonic() > deadline:
                raise ComfyApiError(
                    f"not finished after {self._settings.smoke_timeout:.0f}s (SMOKE_TIMEOUT)"
                )
            await asyncio.sleep(HISTORY_POLL_S)
        images = [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]
        if not images:
            raise ComfyApiError("the prompt finished but SaveImage reported no image")
        image = images[0]
        data = await client.view(image["filename"], image["subfolder"], image["type"])
        if not data.startswith(PNG_SIGNATURE):
            raise ComfyApiError(f"/view returned {len(data)} bytes that are not a PNG")

    async def _check_imports(self, pid: int) -> None:
        """Which custom nodes this process loaded: its start-up log names each failure (the
        HTTP API does not); when the log cannot tell (rotated away), /object_info shows what a
        loaded node registered."""
        nodes = [
            n
            for n in self._state.custom_nodes.values()
            if n.enabled and (n.status == NodeStatus.OK or n.import_failed)
        ]
        if not nodes:
            return
        # The start-up block is near the end unless the log grew a lot since: 2 MiB is plenty.
        text = await asyncio.to_thread(read_end, self._inst.plan.log_path, 2 * 1024 * 1024)
        result = parse_startup_log(text)
        loaded: set[str] = set()
        # Only when the log has no answer: building /object_info holds real ComfyUI's GIL for
        # ~0.12 s, which the smoke prompt beside it would wait behind.
        if not result.complete:
            try:
                loaded = modules_loaded(await self._client.object_info())
            except (aiohttp.ClientError, TimeoutError, ComfyApiError, ValueError) as exc:
                log.warning("object_info unavailable", extra={"fields": {"error": str(exc)}})
        self._check(pid)
        for node in nodes:
            error = result.failures.get(node.name)
            if error is None and not result.complete and node.name not in loaded:
                continue  # neither source can tell (log rotated away, nothing registered)
            node.import_checked = True
            node.import_failed = error is not None
            node.status = NodeStatus.FAILED if error is not None else NodeStatus.OK
            node.error = f"import failed: {error}" if error is not None else None
            if error is not None:
                log.error(
                    "custom node import failed",
                    extra={
                        "fields": {
                            "node": node.name,
                            "instance": self._inst.plan.name,
                            "error": error,
                        }
                    },
                )
        self._state.changed()

    def _finish_smoke(self, started: float, error: str | None, smoke: SmokeResult) -> None:
        smoke.duration_s = round(time.monotonic() - started, 4)
        smoke.status = SmokeStatus.FAILED if error else SmokeStatus.PASSED
        smoke.error = error
        public = smoke is self._inst.public_smoke
        log.log(
            logging.WARNING if error and public else logging.INFO,
            ("smoke through the proxy " if public else "smoke ") + smoke.status.value,
            extra={
                "fields": {
                    "instance": self._inst.plan.name,
                    "pid": smoke.pid,
                    "duration_s": smoke.duration_s,
                    "error": error,
                    **({"url": self._inst.plan.public_url} if public else {}),
                }
            },
        )
        self._state.changed()
