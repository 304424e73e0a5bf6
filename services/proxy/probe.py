"""Does the proxy serve its public ports as it must? Each is asked without the token and must
answer 401: that proves Caddy listens there and keeps ComfyUI shut to anyone without the token.
Results go into ProxyState only (health reads them)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from services.state import MachineState, ProxyState

log = logging.getLogger(__name__)

# While the proxy starts, ask often, so readiness follows its first answer closely.
STARTUP_POLL_S = 0.1


class ProxyProber:
    """Checks the public ports of each new proxy process, then every ``interval``."""

    def __init__(
        self,
        state: MachineState,
        proxy: ProxyState,
        session: aiohttp.ClientSession,
        interval: float,
        timeout: float,
    ) -> None:
        self._state = state
        self._proxy = proxy
        self._session = session
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def run(self) -> None:
        while True:
            proxy = self._proxy
            pid = proxy.pid
            if pid is None or not proxy.process_alive:
                await self._state.wait_changed(self._interval)
                continue
            error = await self.check()
            if proxy.pid != pid or not proxy.process_alive:
                continue  # it died or was replaced meanwhile: says nothing of the new one
            self._record(pid, error)
            await self._wait(pid, STARTUP_POLL_S if proxy.checked_pid != pid else self._interval)

    async def check(self) -> str | None:
        """None when every public port answers 401 without the token, else what was wrong."""
        plan = self._proxy.plan
        for port in plan.ports:
            url = plan.url(port) + "/"
            try:
                # Our own proxy on this host: its certificate is not what is checked here.
                async with self._session.get(
                    url, timeout=self._timeout, ssl=False, allow_redirects=False
                ) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return f"{url} does not answer ({detail})"
            if status != 401:
                return (
                    f"{url} answered HTTP {status} to a request without the token, not 401: "
                    "the proxy is not keeping ComfyUI shut; see its configuration and log "
                    f"({plan.config_path}, {plan.log_path})"
                )
        return None

    def _record(self, pid: int, error: str | None) -> None:
        proxy = self._proxy
        if error is None:
            if proxy.checked_pid != pid or proxy.check_failures:
                log.info("proxy serving", extra={"fields": {
                    "program": proxy.plan.name, "pid": pid,
                    "ports": list(proxy.plan.ports), "listen": proxy.plan.listen}})
            proxy.checked_pid, proxy.check_failures, proxy.check_error = pid, 0, None
        else:
            proxy.check_failures += 1
            if proxy.checked_pid == pid and proxy.check_error != error:
                log.warning("proxy check failed", extra={"fields": {
                    "program": proxy.plan.name, "pid": pid, "error": error}})
            proxy.check_error = error
        self._state.changed()

    async def _wait(self, pid: int, seconds: float) -> None:
        """Up to ``seconds``; sooner when the proxy process dies or is replaced."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._proxy.pid != pid or not self._proxy.process_alive:
                return
            await self._state.wait_changed(remaining)
        await asyncio.sleep(0)
