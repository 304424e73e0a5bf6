"""Git servers on loopback for the tests: git's "dumb" HTTP protocol over static files with
an Authorization check that records every request, and a server that accepts connections and
never answers (a stalled network). No network beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import git


@dataclass
class Seen:
    """One request the server answered."""

    path: str
    authorization: str | None
    status: int


@dataclass
class GitHttpServer:
    """Serves bare repositories under ``root`` (``http://127.0.0.1:<port>/<name>.git``) to
    requests whose Authorization header is one of ``accepted`` (every request if empty);
    others get 401. Paths that do not exist get 404."""

    root: Path
    accepted: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def url(self, name: str, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{name}.git"

    def publish(self, source: Path, name: str) -> str:
        """A bare copy of the repository at ``source`` served as ``name``; its URL."""
        dest = self.root / f"{name}.git"
        git.Repo.clone_from(str(source), str(dest), bare=True).close()
        with git.Repo(dest) as repo:
            repo.git.update_server_info()
        return self.url(name)


@contextlib.contextmanager
def git_http_server(root: Path, accepted: set[str] | None = None) -> Iterator[GitHttpServer]:
    root.mkdir(parents=True, exist_ok=True)
    state = GitHttpServer(root, set(accepted or ()))

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            if state.accepted and auth not in state.accepted:
                state.seen.append(Seen(self.path, auth, 401))
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            target = Path(self.translate_path(self.path))
            state.seen.append(Seen(self.path, auth, 200 if target.is_file() else 404))
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stalled_server() -> Iterator[int]:
    """A TCP port on loopback that accepts connections and never sends a byte; its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = listener.accept()
                held.append(conn)  # kept open, never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
