"""Is a TCP port free to bind? If not, who holds it? (ComfyUI only finds out after ~10 s.)"""

from __future__ import annotations

import errno
import socket

import psutil


def _holder(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "another process"
                try:
                    proc = psutil.Process(conn.pid)
                    cmd = " ".join(proc.cmdline())[:120] or proc.name()
                except psutil.Error:
                    cmd = "?"
                return f"pid {conn.pid} ({cmd})"
    except psutil.Error:
        pass
    return "another process"


def port_in_use(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else who holds it, as readable text."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option aiohttp binds with, so TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return _holder(port)
            return f"cannot bind ({exc.strerror})"
    return None
