"""Raw HTTP/1.1 over real sockets: what a misbehaving client sends, and what came back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


class Conn:
    """One client connection to 127.0.0.1:port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_closed(self, within: float) -> tuple[float, bytes]:
        """Everything until the server closes; (seconds it took, bytes). TimeoutError if the
        connection is still open after ``within`` seconds."""
        started = time.monotonic()
        chunks = []
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return time.monotonic() - started, b"".join(chunks)

    async def is_open_after(self, seconds: float) -> bool:
        """True when the server has not closed (nor sent anything) within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                data = await self.reader.read(1)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        assert data == b"", f"unexpected bytes from the server: {data!r}"
        return False

    async def request(self, path: str) -> Answer:
        """A complete keep-alive GET and its answer (the connection stays open)."""
        self.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        async with asyncio.timeout(10):
            head = await self.reader.readuntil(b"\r\n\r\n")
            answer = parse(head)
            answer.body = await self.reader.readexactly(int(answer.headers["content-length"]))
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
