"""Fetch one model file: stream to ``<file>.part`` hashing as it arrives, resume with Range,
retry with backoff, check size and sha256, fsync and rename. ``file://`` copies the same way.

A token (from ``auth_env``) only ever goes into the Authorization header: no message, log
line or exception built here contains it, nor a URL's query string."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp

from config.models import ModelSpec, public_url
from services.models.errors import ModelError, TransientError
from services.models.paths import part_meta_path, part_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Space left free on the disk besides the file itself.
FREE_MARGIN = 64 << 20
WRITEBACK_EVERY = 64 << 20
IN_FLIGHT = 3  # chunks handed to the writer thread and not yet written
Progress = Callable[[int, int | None], None]  # (bytes just written, total if known)


@dataclass(frozen=True)
class FetchOptions:
    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def check_free(spec: ModelSpec, directory: Path, needed: int) -> None:
    """ModelError with the numbers when ``needed`` bytes (plus a margin) do not fit."""
    free = shutil.disk_usage(directory).free
    if needed + FREE_MARGIN > free:
        raise ModelError(
            f"{spec.name}: not enough disk space in {directory}: needs {_gib(needed)} plus a "
            f"{FREE_MARGIN >> 20} MiB margin, {_gib(free)} free; free space or point "
            "COMFYUI_MODELS_PATH at a larger disk"
        )


class _Sink:
    """The .part file and its running sha256, written from one worker thread so that hashing
    and writing chunk n overlap reading chunk n+1 on the event loop."""

    def __init__(self, spec: ModelSpec, path: Path, offset: int, hasher: hashlib._Hash) -> None:
        self.spec = spec
        self.path = path
        self.hasher = hasher
        self.offset = offset
        self._fh = path.open("r+b" if offset else "wb", buffering=0)
        self._fh.seek(offset)
        self._fh.truncate()
        self._written_back = offset

    def _disk_full(self) -> ModelError:
        return ModelError(
            f"{self.spec.name}: the disk filled up after {_gib(self.offset)} of the file "
            f"({self.path.parent}: {_gib(shutil.disk_usage(self.path.parent).free)} "
            "free); the partial file was removed"
        )

    def write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        try:
            view = memoryview(chunk)
            while view:  # an unbuffered write may be short
                view = view[self._fh.write(view) :]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full() from None
            raise
        self.offset += len(chunk)
        if self.offset - self._written_back >= WRITEBACK_EVERY:
            # Start writing back what is done (without waiting), so the final fsync is short
            # and dirty pages do not pile up into a stall.
            os.posix_fadvise(
                self._fh.fileno(),
                self._written_back,
                self.offset - self._written_back,
                os.POSIX_FADV_DONTNEED,
            )
            self._written_back = self.offset

    def close(self, sync: bool) -> None:
        try:
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._disk_full() from None
            raise
        finally:
            with contextlib.suppress(OSError):
                self._fh.close()


def _hash_prefix(path: Path) -> hashlib._Hash:
    """The running hash of a partial file left by an earlier process (resume across restarts)."""
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK * 4):
            hasher.update(block)
    return hasher


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _finish(spec: ModelSpec, part: Path, dest: Path, size: int, digest: str) -> None:
    """Check size and sha256 against the manifest, then rename into place (or remove)."""
    problems = []
    if spec.size is not None and size != spec.size:
        problems.append(f"size: expected {spec.size} bytes, got {size}")
    if spec.sha256 is not None and digest != spec.sha256:
        problems.append(f"sha256: expected {spec.sha256}, got {digest}")
    if problems:
        _remove(part, part_meta_path(dest))
        raise ModelError(
            f"{spec.name}: {'; '.join(problems)} (from {public_url(spec.url)}); the file was "
            "removed. Check the manifest's size/sha256 or the URL"
        )
    os.replace(part, dest)
    _remove(part_meta_path(dest))
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def copy_file(spec: ModelSpec, dest: Path, progress: Progress) -> str:
    """``file://`` source: copy with the same checks (blocking; run it in a thread)."""
    source = Path(unquote(urlparse(spec.url).path))
    try:
        total = source.stat().st_size
    except OSError as exc:
        raise ModelError(f"{spec.name}: cannot read {source}: {exc.strerror}") from None
    if spec.size is not None and total != spec.size:
        raise ModelError(
            f"{spec.name}: size: expected {spec.size} bytes, got {total} "
            f"({source}); nothing was copied"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_free(spec, dest.parent, total)
    part = part_path(dest)
    sink = _Sink(spec, part, 0, hashlib.sha256())
    try:
        with source.open("rb") as fh:
            while block := fh.read(CHUNK * 4):
                sink.write(block)
                progress(len(block), total)
    except BaseException:
        sink.close(sync=False)
        _remove(part)
        raise
    sink.close(sync=True)
    digest = sink.hasher.hexdigest()
    _finish(spec, part, dest, sink.offset, digest)
    return digest


def _http_error(spec: ModelSpec, status: int, token_set: bool) -> ModelError | None:
    """A clear error for answers that retrying cannot fix; None for retryable ones."""
    where = public_url(spec.url)
    if status in (401, 403):
        if spec.auth_env and not token_set:
            hint = f"missing token? {spec.auth_env} is not set in the environment"
        elif spec.auth_env:
            hint = f"the token in {spec.auth_env} was refused: check it grants access to this file"
        else:
            hint = "missing token? set auth_env to the name of a variable holding one (HF_TOKEN)"
        return ModelError(f"{spec.name}: {where} answered HTTP {status}; {hint}")
    if status == 404:
        return ModelError(
            f"{spec.name}: {where} answered HTTP 404 (not found); check the URL "
            "(gated repositories may also answer 404 without a token)"
        )
    if 400 <= status < 500 and status not in (408, 429):
        return ModelError(f"{spec.name}: {where} answered HTTP {status}")
    return None


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes 100-199/200`` -> (100, 200); the total is None when the server writes ``*``."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        span, _, total = value[6:].partition("/")
        return int(span.split("-", 1)[0]), (None if total in ("", "*") else int(total))
    except ValueError:
        return None


class HttpFetch:
    """One http(s) download with its resume state kept across retries in this process."""

    def __init__(
        self,
        spec: ModelSpec,
        dest: Path,
        session: aiohttp.ClientSession,
        token: str | None,
        progress: Progress,
        options: FetchOptions,
    ) -> None:
        self.spec, self.dest, self.session = spec, dest, session
        self.token, self.progress, self.options = token, progress, options
        self.part, self.meta = part_path(dest), part_meta_path(dest)
        self.offset = 0
        self.hasher: hashlib._Hash | None = None
        self.etag: str | None = None
        self.total: int | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model-write")

    def _load_partial(self) -> None:
        """Pick up a .part an earlier process left, if its metadata says it is this URL's."""
        try:
            meta = json.loads(self.meta.read_text())
            size = self.part.stat().st_size
        except (OSError, ValueError):
            _remove(self.part, self.meta)
            return
        if meta.get("url") != public_url(self.spec.url) or not isinstance(meta.get("etag"), str):
            _remove(self.part, self.meta)
            return
        self.etag, self.offset = meta["etag"], size
        self.total = meta.get("total") if isinstance(meta.get("total"), int) else None
        self.hasher = _hash_prefix(self.part)

    async def run(self) -> str:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._load_partial)
        try:
            attempt = 0
            while True:
                try:
                    await self._attempt()
                    break
                except TransientError as exc:
                    attempt += 1
                    if attempt > self.options.retries:
                        raise ModelError(
                            f"{self.spec.name}: gave up after {attempt} attempts at "
                            f"{public_url(self.spec.url)}: {exc}"
                        ) from None
                    delay = min(
                        self.options.backoff_s * 2 ** (attempt - 1), self.options.backoff_max_s
                    )
                    log.warning(
                        "model download retry",
                        extra={
                            "fields": {
                                "model": self.spec.name,
                                "attempt": attempt,
                                "error": str(exc),
                                "offset": self.offset,
                                "retry_in_s": delay,
                            }
                        },
                    )
                    await asyncio.sleep(delay)
            assert self.hasher is not None
            digest = self.hasher.hexdigest()
            await asyncio.to_thread(_finish, self.spec, self.part, self.dest, self.offset, digest)
            return digest
        except ModelError:
            if not self.etag:  # nothing to resume from: do not leave a stray partial file
                _remove(self.part, self.meta)
            raise
        finally:
            self._executor.shutdown(wait=True)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.offset and self.hasher is not None:
            headers["Range"] = f"bytes={self.offset}-"
            if self.etag:
                headers["If-Range"] = self.etag
        return headers

    async def _attempt(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.options.connect_timeout_s,
            sock_read=self.options.read_timeout_s,
        )
        try:
            async with self.session.get(
                self.spec.url, headers=self._headers(), timeout=timeout
            ) as resp:
                await self._stream(resp)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # Only the class name and aiohttp's short message: never headers or the full URL.
            text = type(exc).__name__
            if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
                text += " (the connection dropped mid-stream)"
            raise TransientError(text) from None

    async def _stream(self, resp: aiohttp.ClientResponse) -> None:
        spec = self.spec
        error = _http_error(spec, resp.status, bool(self.token))
        if error is not None:
            raise error
        if resp.status >= 400:
            raise TransientError(f"HTTP {resp.status}")
        length = resp.content_length
        span = _content_range(resp.headers.get("Content-Range"))
        etag = resp.headers.get("ETag")
        if (
            resp.status == 206
            and span is not None
            and span[0] == self.offset
            and (self.total is None or span[1] in (None, self.total))
            and (self.etag is None or etag in (None, self.etag))
        ):
            total = span[1] or (self.offset + length if length is not None else spec.size)
        elif resp.status == 206:
            # A part of something else (another ETag or total, or a range we did not ask
            # for): start over without Range rather than splice it in.
            log.info(
                "model download restarts",
                extra={
                    "fields": {
                        "model": spec.name,
                        "reason": "the server's partial answer does not continue "
                        "the file (ETag, total or range changed)",
                        "discarded_bytes": self.offset,
                    }
                },
            )
            self.progress(-self.offset, None)
            self.offset, self.hasher, self.etag, self.total = 0, None, None, None
            _remove(self.part, self.meta)
            raise TransientError("the server's partial answer did not continue the file")
        else:
            if self.offset:
                log.info(
                    "model download restarts",
                    extra={
                        "fields": {
                            "model": spec.name,
                            "reason": f"HTTP {resp.status} to a Range request "
                            "(no Range support, or the file changed)",
                            "discarded_bytes": self.offset,
                        }
                    },
                )
                self.progress(-self.offset, None)
            self.offset, self.hasher = 0, hashlib.sha256()
            total = length if length is not None else spec.size
        if self.hasher is None:
            self.hasher = hashlib.sha256()
        if spec.size is not None and total is not None and total != spec.size:
            _remove(self.part, self.meta)
            raise ModelError(
                f"{spec.name}: size: expected {spec.size} bytes, got {total} (the server's "
                f"Content-Length at {public_url(spec.url)}); nothing was kept. Check the "
                "manifest's size or the URL"
            )
        self.etag, self.total = etag, total
        if total is not None:
            await asyncio.to_thread(check_free, spec, self.dest.parent, total - self.offset)
        self.meta.write_text(
            json.dumps({"url": public_url(spec.url), "etag": self.etag, "total": total})
        )
        sink = _Sink(spec, self.part, self.offset, self.hasher)
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[None]] = deque()
        ok = False
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                if len(pending) >= IN_FLIGHT:
                    await pending.popleft()
                    self.offset = sink.offset
                pending.append(loop.run_in_executor(self._executor, sink.write, chunk))
                self.progress(len(chunk), total)
            while pending:
                await pending.popleft()
            ok = True
        finally:
            for future in pending:
                with contextlib.suppress(Exception):
                    await future
            await loop.run_in_executor(self._executor, sink.close, ok)
            self.offset = sink.offset
        if total is not None and self.offset < total:
            raise TransientError(f"the stream ended after {self.offset} of {total} bytes")


async def fetch_model(
    spec: ModelSpec,
    dest: Path,
    session: aiohttp.ClientSession,
    token: str | None,
    progress: Progress,
    options: FetchOptions,
) -> str:
    """Download (or copy) ``spec`` to ``dest``; its sha256. ModelError names what failed."""
    try:
        if urlparse(spec.url).scheme == "file":
            return await asyncio.to_thread(copy_file, spec, dest, progress)
        return await HttpFetch(spec, dest, session, token, progress, options).run()
    except ModelError as exc:
        if "the disk filled up" in str(exc):
            _remove(part_path(dest), part_meta_path(dest))
        raise
