"""Bring the manifest's models into the store: warm check against the verified record, else
download (bounded concurrency) and verify. Progress and outcomes go into MachineState."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from config.errors import DiskFullError
from config.models import ModelSpec, public_url
from services.models.download import DISK_FULL_ERRNOS, FetchOptions, disk_full_error, fetch_model
from services.models.errors import ModelError
from services.models.paths import destination
from services.models.record import VerifiedRecord
from services.state import MachineState, ModelState, ModelStatus

log = logging.getLogger(__name__)

CHANGED_EVERY_S = 0.25  # progress wakes ?wait= waiters at most this often


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of the file as read."""
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        return fh.tell(), digest


def _on_disk(spec: ModelSpec, dest: Path, record: VerifiedRecord) -> tuple[int | None, str | None]:
    """(size or None when absent, the recorded sha256 if the file is unchanged since hashed)."""
    try:
        size = dest.stat().st_size if dest.is_file() else None
    except OSError:
        return None, None
    return size, (
        record.lookup(spec.name, dest, spec.sha256, spec.size) if size is not None else None
    )


def _discard(spec: ModelSpec, dest: Path, record: VerifiedRecord) -> None:
    record.forget(spec.name)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()


def register_models(state: MachineState, specs: list[ModelSpec], models_path: Path) -> None:
    """Put every manifest model into the state as missing (health lists them at once)."""
    for spec in specs:
        state.models.setdefault(
            spec.name,
            ModelState(
                name=spec.name,
                folder=spec.folder,
                filename=spec.filename,
                url=public_url(spec.url),
                path=str(models_path / spec.folder / spec.filename),
                required=spec.required,
                when=spec.when,
                size=spec.size,
                sha256=spec.sha256,
                bytes_total=spec.size,
            ),
        )
    state.models_configured = state.models_configured or bool(specs)
    state.changed()


class ModelFetcher:
    """Fetches and verifies specs into ``models_path``; one instance per agent or command."""

    def __init__(
        self,
        specs: list[ModelSpec],
        models_path: Path,
        state: MachineState,
        workers: int = 4,
        options: FetchOptions | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.specs = specs
        self.models_path = models_path
        self.state = state
        self.options = options or FetchOptions()
        self._environ = os.environ if environ is None else environ
        self._sem = asyncio.Semaphore(workers)
        self._last_changed = 0.0
        register_models(state, specs, models_path)

    def _changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_changed >= CHANGED_EVERY_S:
            self._last_changed = now
            self.state.changed()

    async def run(self, when: str | None = None) -> list[ModelState]:
        """Fetch the specs (only those with ``when`` if given); the failed ones' states."""
        specs = [s for s in self.specs if when is None or s.when == when]
        if not specs:
            return []
        self.models_path.mkdir(parents=True, exist_ok=True)
        record = await asyncio.to_thread(VerifiedRecord, self.models_path)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            await asyncio.gather(*(self._one(s, session, record) for s in specs))
        self._changed(force=True)
        return [
            self.state.models[s.name]
            for s in specs
            if self.state.models[s.name].status == ModelStatus.FAILED
        ]

    async def _one(
        self, spec: ModelSpec, session: aiohttp.ClientSession, record: VerifiedRecord
    ) -> None:
        ms = self.state.models[spec.name]
        ms.error = None
        try:
            dest = destination(self.models_path, spec)
            if await self._warm(spec, dest, record, ms):
                return
            async with self._sem:
                await self._download(spec, dest, session, record, ms)
        except (ModelError, DiskFullError) as exc:
            self._fail(ms, str(exc))
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                where = Path(ms.path).parent
                self._fail(ms, str(disk_full_error(spec, where, exc.strerror or "ENOSPC")))
            else:
                self._fail(ms, f"{spec.name}: {exc.strerror or exc} ({exc.filename or ms.path})")

    async def _warm(
        self, spec: ModelSpec, dest: Path, record: VerifiedRecord, ms: ModelState
    ) -> bool:
        """True when ``dest`` is already the right file (recorded, or hashed now)."""
        size, digest = _on_disk(spec, dest, record)
        if size is None:
            return False
        if size == 0:  # never a model, whatever a record or the manifest says
            log.warning(
                "model on disk is empty; fetching it again", extra={"fields": {"model": spec.name}}
            )
            _discard(spec, dest, record)
            return False
        if digest is None:
            size, digest = await asyncio.to_thread(hash_file, dest)
            if (spec.size is not None and size != spec.size) or (
                spec.sha256 is not None and digest != spec.sha256
            ):
                log.warning(
                    "model on disk does not match the manifest; fetching it again",
                    extra={"fields": {"model": spec.name, "size": size, "sha256": digest}},
                )
                _discard(spec, dest, record)
                return False
            record.add(spec.name, dest, digest)
        ms.bytes_done = ms.bytes_total = size
        self._verified(ms, spec, digest)
        return True

    async def _download(
        self,
        spec: ModelSpec,
        dest: Path,
        session: aiohttp.ClientSession,
        record: VerifiedRecord,
        ms: ModelState,
    ) -> None:
        loop = asyncio.get_running_loop()
        ms.status, ms.started_at = ModelStatus.DOWNLOADING, time.time()
        ms.session_bytes = ms.bytes_done = 0
        self._changed(force=True)
        log.info("model download", extra={"fields": {"model": spec.name, "url": ms.url}})

        def progress(n: int, total: int | None) -> None:
            ms.bytes_done = max(ms.bytes_done + n, 0)
            if n > 0:
                ms.session_bytes += n
                self.state.download_bytes_total += n
            if total is not None:
                ms.bytes_total = total
            self._changed()

        def threadsafe(n: int, total: int | None) -> None:
            loop.call_soon_threadsafe(progress, n, total)

        token = self._environ.get(spec.auth_env) if spec.auth_env else None
        is_file = spec.url.startswith("file:")
        digest = await fetch_model(
            spec, dest, session, token or None, threadsafe if is_file else progress, self.options
        )
        await asyncio.sleep(0)  # let queued thread-side progress land
        # What is on disk, whatever retries and restarts the progress counted on the way.
        ms.bytes_done = ms.bytes_total = record.add(spec.name, dest, digest)
        self._verified(ms, spec, digest)
        elapsed = time.time() - (ms.started_at or time.time())
        log.info(
            f"model {ms.status}",
            extra={
                "fields": {
                    "model": spec.name,
                    "bytes": ms.bytes_done,
                    "seconds": round(elapsed, 3),
                    "sha256": digest,
                }
            },
        )

    def _verified(self, ms: ModelState, spec: ModelSpec, digest: str) -> None:
        """On disk: ``verified`` when the manifest's sha256 or size was checked, else
        ``unverified`` (present, but nothing said what the file should be)."""
        if not spec.verifiable:
            log.warning(
                "model kept unverified: the manifest gives neither sha256 nor size",
                extra={"fields": {"model": spec.name, "sha256": digest}},
            )
        status = ModelStatus.VERIFIED if spec.verifiable else ModelStatus.UNVERIFIED
        ms.status, ms.verified_sha256, ms.error = status, digest, None
        ms.finished_at = time.time()
        self.state.models_generation += 1
        self._changed(force=True)

    def _fail(self, ms: ModelState, error: str) -> None:
        ms.status, ms.error, ms.finished_at = ModelStatus.FAILED, error, time.time()
        log.error("model failed", extra={"fields": {"model": ms.name, "error": error}})
        self._changed(force=True)
