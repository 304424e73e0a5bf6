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
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp

from config.errors import DiskFullError
from config.models import ModelSpec, public_url
from services.models.errors import ChecksumMismatch, ModelError, TransientError
from services.models.options import FetchOptions
from services.models.paths import part_meta_path, part_path
from services.models.record import read_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Space left free on the disk besides the file itself.
FREE_MARGIN = 64 << 20
WRITEBACK_EVERY = 64 << 20
IN_FLIGHT = 3  # chunks handed to the writer thread and not yet written
PART_META_MAX_BYTES = 64 << 10
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
Progress = Callable[[int, int | None], None]  # (bytes just written, total if known)




def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def _free(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full_error(spec: ModelSpec, directory: Path, detail: str) -> DiskFullError:
    """``<model>: workspace disk full: N bytes free in <dir>; <detail>; <what to do>``."""
    free = _free(directory)
    return DiskFullError(
        f"{spec.name}: workspace disk full: {'an unknown number of' if free is None else free} "
        f"bytes free in {directory}; {detail}; free space or point COMFYUI_MODELS_PATH at a "
        "larger disk"
    )


def check_free(spec: ModelSpec, directory: Path, needed: int) -> None:
    """DiskFullError with the numbers when ``needed`` bytes (plus a margin) do not fit."""
    free = shutil.disk_usage(directory).free
    if needed + FREE_MARGIN > free:
        raise disk_full_error(
            spec,
            directory,
            f"not enough disk space for {_gib(needed)} plus a {FREE_MARGIN >> 20} MiB margin",
        )


class _Sink:
    """The .part file and its running sha256, written from one worker thread so that hashing
    and writing chunk n overlap reading chunk n+1 on the event loop. ENOSPC is a DiskFullError;
    whoever owns the file removes it."""

    def __init__(self, spec: ModelSpec, path: Path, offset: int, hasher: hashlib._Hash) -> None:
        self.spec = spec
        self.path = path
        self.hasher = hasher
        self.offset = offset
        # Never through a symlink: a planted .part must not write outside the store.
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= 0 if offset else os.O_CREAT | os.O_TRUNC
        try:
            self._fh = os.fdopen(os.open(path, flags, 0o644), "r+b", buffering=0)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:  # not even an inode left
                raise self._disk_full() from None
            raise
        self._fh.seek(offset)
        self._fh.truncate()
        self._written_back = offset

    def _disk_full(self) -> DiskFullError:
        return disk_full_error(
            self.spec,
            self.path.parent,
            f"the disk filled up after {_gib(self.offset)} of the file; the partial file "
            "was removed",
        )

    def write(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        try:
            view = memoryview(chunk)
            while view:  # an unbuffered write may be short
                view = view[self._fh.write(view) :]
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
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
            if exc.errno in DISK_FULL_ERRNOS:
                raise self._disk_full() from None
            raise
        finally:
            with contextlib.suppress(OSError):
                self._fh.close()


def _hash_prefix(path: Path) -> hashlib._Hash:
    """The running hash of a partial file left by an earlier process (resume across restarts)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256")


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _finish(spec: ModelSpec, part: Path, dest: Path, size: int, digest: str) -> None:
    """Check size and sha256 against the manifest, then rename into place (or remove). An
    empty file is never kept, whatever the manifest says."""
    if size == 0:
        _remove(part, part_meta_path(dest))
        raise ModelError(
            f"{spec.name}: got an empty file (0 bytes) from {public_url(spec.url)}; a model "
            "is never empty, nothing was kept. Check the URL"
        )
    problems = []
    if spec.size is not None and size != spec.size:
        problems.append(f"size: expected {spec.size} bytes, got {size}")
    if spec.sha256 is not None and digest != spec.sha256:
        problems.append(f"sha256: expected {spec.sha256}, got {digest}")
    if problems:
        _remove(part, part_meta_path(dest))
        raise ChecksumMismatch(
            f"{spec.name}: {'; '.join(problems)} (from {public_url(spec.url)}); the file was "
            "removed. Check the manifest's size/sha256 or the URL",
            spec.sha256 if spec.sha256 != digest else None,
            digest,
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
    _remove(part)  # a stale one (or a planted symlink): the copy starts over
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
        """Pick up a .part an earlier process left, if its metadata says it is this URL's
        (with an ETag to resume against); otherwise the download starts over. Metadata of any
        unexpected shape counts as none (a warning says so)."""
        if not (os.path.lexists(self.part) or os.path.lexists(self.meta)):
            return
        why = self._unusable_partial()
        if why is not None:
            log.warning(
                "partial download not resumed; it starts over",
                extra={"fields": {"model": self.spec.name, "path": str(self.meta), "why": why}},
            )
            _remove(self.part, self.meta)
            return
        self.hasher = _hash_prefix(self.part)

    def _unusable_partial(self) -> str | None:
        """Why the .part and its .part.json cannot be resumed, or None (then etag, total and
        offset are taken from them)."""
        if not self.spec.verifiable:
            return "no sha256 or size in the manifest: only a whole 200 answer is kept"
        try:
            meta = read_json(self.meta, PART_META_MAX_BYTES)
            st = os.lstat(self.part)
        except (OSError, ValueError) as exc:
            return f"unreadable: {exc}"[:300]
        if not isinstance(meta, dict):
            return f"the metadata is a {type(meta).__name__}, not an object"
        url, etag, total = meta.get("url"), meta.get("etag"), meta.get("total")
        if url != public_url(self.spec.url):
            return "it was for another URL"
        if not isinstance(etag, str) or not etag:
            return "no ETag to resume against"
        if total is not None and (
            not isinstance(total, int) or isinstance(total, bool) or total <= 0
        ):
            return f"its total is not a size: {str(total)[:40]!r}"
        if not stat.S_ISREG(st.st_mode):
            return "the .part is not a regular file"
        if total is not None and st.st_size > total:
            return f"the .part holds {st.st_size} bytes, more than the file's {total}"
        size = self.spec.size
        if size is not None and (st.st_size > size or total not in (None, size)):
            return f"it disagrees with the manifest's size of {size} bytes"
        self.etag, self.total, self.offset = etag, total, st.st_size
        return None

    async def run(self) -> str:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._load_partial)
        try:
            attempt = 0
            while True:
                try:
                    await self._attempt()
                    break
                except (TransientError, DiskFullError) as exc:
                    # A full disk is retried too: space freed meanwhile lets a later attempt
                    # finish without restarting the agent.
                    attempt += 1
                    if attempt > self.options.retries and isinstance(exc, DiskFullError):
                        raise DiskFullError(f"{exc} (gave up after {attempt} attempts)") from None
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
        except (ModelError, DiskFullError):
            if not self.etag:  # nothing to resume from: do not leave a stray partial file
                _remove(self.part, self.meta)
            raise
        finally:
            self._executor.shutdown(wait=True)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.offset and self.hasher is not None and self.spec.verifiable:
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
        """One answer: where it starts, checks before writing, then the body into the .part."""
        self._check_status(resp)
        etag = resp.headers.get("ETag")
        total = self._start(resp, etag)
        try:
            await self._prepare(total, etag)
            await self._write_body(resp, total)
        except DiskFullError:
            # The disk is full: the partial file goes with the error (whatever it held), so
            # it holds no space, and a later attempt starts over.
            if self.offset:
                self._discard("the disk is full")
            self.offset, self.hasher, self.etag, self.total = 0, None, None, None
            _remove(self.part, self.meta)
            raise
        if total is not None and self.offset < total:
            raise TransientError(f"the stream ended after {self.offset} of {total} bytes")

    def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        """Only 200, or 206 to a resume, is a body to keep (after aiohttp followed the
        redirects): a redirect it could not follow, 204 or any other answer fails naming its
        status; 5xx, 408 and 429 are retried."""
        status, where = resp.status, public_url(self.spec.url)
        if status == 416 and self.offset:
            # The partial file is not a prefix of what the server has now: start over.
            self._discard("HTTP 416 to a Range request (the file is shorter than the partial)")
            self.offset, self.hasher, self.etag, self.total = 0, None, None, None
            _remove(self.part, self.meta)
            raise TransientError("HTTP 416 to a Range request")
        error = _http_error(self.spec, status, bool(self.token))
        if error is not None:
            raise error
        if status >= 400:
            raise TransientError(f"HTTP {status}")
        if status not in (200, 206):
            what = (
                " (a redirect that could not be followed: no usable Location)"
                if 300 <= status < 400
                else ""
            )
            raise ModelError(
                f"{self.spec.name}: {where} answered HTTP {status}{what}, not 200 with the file; "
                "nothing was kept. Check the URL"
            )
        if not self.spec.verifiable:
            self._check_whole(resp)

    def _check_whole(self, resp: aiohttp.ClientResponse) -> None:
        """With neither sha256 nor size in the manifest, only a 200 whose framing shows the
        body is whole (Content-Length, or chunked with its last chunk) is kept."""
        hint = "add sha256 (or size) to the manifest entry"
        if resp.status != 200:
            raise ModelError(
                f"{self.spec.name}: {public_url(self.spec.url)} answered HTTP {resp.status} "
                f"(a part of the file) to a request for the whole file; without sha256 or size "
                f"only a whole 200 answer is kept: {hint}"
            )
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        if resp.content_length is None and not chunked:
            raise ModelError(
                f"{self.spec.name}: {public_url(self.spec.url)} answered without Content-Length "
                "or chunked framing, so a cut-off body cannot be told from a whole one; "
                f"nothing was kept: {hint}"
            )

    def _continues(self, status: int, span: tuple[int, int | None], etag: str | None) -> bool:
        """A 206 that continues the partial file exactly (offset, total and ETag agree)."""
        return (
            status == 206
            and span[0] == self.offset
            and (self.total is None or span[1] in (None, self.total))
            and (self.etag is None or etag in (None, self.etag))
        )

    def _start(self, resp: aiohttp.ClientResponse, etag: str | None) -> int | None:
        """Continue at ``offset`` or start over from byte 0; the total size when known."""
        length = resp.content_length
        span = _content_range(resp.headers.get("Content-Range"))
        if span is not None and self._continues(resp.status, span, etag):
            if self.hasher is None:
                self.hasher = hashlib.sha256()
            return span[1] or (self.offset + length if length is not None else self.spec.size)
        if resp.status == 206:
            # A part of something else (another ETag or total, or a range we did not ask
            # for): start over without Range rather than splice it in.
            self._discard(
                "the server's partial answer does not continue the file (ETag, total or "
                "range changed)"
            )
            self.offset, self.hasher, self.etag, self.total = 0, None, None, None
            _remove(self.part, self.meta)
            raise TransientError("the server's partial answer did not continue the file")
        if self.offset:
            self._discard(
                f"HTTP {resp.status} to a Range request (no Range support, or the file changed)"
                if self.spec.verifiable
                else "no sha256 or size in the manifest: only a whole 200 answer is kept"
            )
        self.offset, self.hasher = 0, hashlib.sha256()
        return length if length is not None else self.spec.size

    def _discard(self, reason: str) -> None:
        """Take back the progress of bytes that will be downloaded again."""
        log.info(
            "model download restarts",
            extra={
                "fields": {
                    "model": self.spec.name,
                    "reason": reason,
                    "discarded_bytes": self.offset,
                }
            },
        )
        self.progress(-self.offset, None)

    async def _prepare(self, total: int | None, etag: str | None) -> None:
        """Refuse a size the manifest does not expect or that does not fit; then record what
        is being downloaded beside the .part, so a later process can resume it."""
        spec = self.spec
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
        try:
            self.meta.write_text(
                json.dumps({"url": public_url(spec.url), "etag": self.etag, "total": total})
            )
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(
                    spec, self.dest.parent, "no room for the download's metadata"
                ) from None
            raise

    async def _write_body(self, resp: aiohttp.ClientResponse, total: int | None) -> None:
        """Stream the body into the .part: hashing and writing (a worker thread) overlap
        reading, at most IN_FLIGHT chunks ahead; ``offset`` follows what is written."""
        assert self.hasher is not None
        sink = _Sink(self.spec, self.part, self.offset, self.hasher)
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


async def fetch_model(
    spec: ModelSpec,
    dest: Path,
    session: aiohttp.ClientSession,
    token: str | None,
    progress: Progress,
    options: FetchOptions,
) -> str:
    """Download (or copy) ``spec`` to ``dest``; its sha256. ModelError (or DiskFullError)
    names what failed."""
    if urlparse(spec.url).scheme == "file":
        return await asyncio.to_thread(copy_file, spec, dest, progress)
    return await HttpFetch(spec, dest, session, token, progress, options).run()
