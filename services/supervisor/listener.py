"""supervisord event listener: relays PROCESS_STATE events to the agent as datagrams, and
kills what an instance leaves behind.

Run by supervisord (``python -m services.supervisor.listener <socket> [<group>]``). It speaks
the event listener protocol on stdin/stdout and never blocks supervisord: if the agent is not
listening the event is dropped (the agent re-reads every state over XML-RPC).

supervisord signals a program's process group only while the program's main process lives;
once ComfyUI exits, a child that ignored SIGINT would live on holding GPU memory. So when a
program of ``<group>`` exits or stops, its process group (supervisord makes each program a
group leader) is killed here, inside supervisord's tree, which works even if the agent died.
Stdlib only, so it starts fast and cannot break with the agent's dependencies."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import TextIO


def parse_tokens(line: str) -> dict[str, str]:
    """Parse supervisord's ``key:value key:value`` header/payload format."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


GONE_EVENTS = ("PROCESS_STATE_EXITED", "PROCESS_STATE_STOPPED")


def reap_group(event: str, payload: dict[str, str], group: str | None) -> bool:
    """Kill the process group of a program of ``group`` that just exited; True if any was."""
    pid = payload.get("pid")
    if group is None or event not in GONE_EVENTS or payload.get("groupname") != group or not pid:
        return False
    try:
        os.killpg(int(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left in the group
        return False
    return True


def relay(
    stdin: TextIO, stdout: TextIO, sock: socket.socket, address: str, group: str | None = None
) -> None:
    """Serve events until stdin closes: READY, read header and payload, forward, RESULT OK."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header_line = stdin.readline()
        if not header_line:
            return
        headers = parse_tokens(header_line)
        body = stdin.read(int(headers.get("len", "0")))
        first_line, _, data = body.partition("\n")
        message = {
            "event": headers.get("eventname", ""),
            "serial": int(headers.get("serial", "0")),
            "payload": parse_tokens(first_line),
            "data": data,
        }
        if reap_group(message["event"], message["payload"], group):
            print(
                f"killed leftovers of {message['payload'].get('processname')}",
                file=sys.stderr,
                flush=True,
            )
        try:
            sock.sendto(json.dumps(message).encode(), address)
        except OSError as exc:  # agent gone or not listening yet: it resyncs over XML-RPC
            print(f"event not relayed ({exc}): {message['event']}", file=sys.stderr, flush=True)
        stdout.write("RESULT 2\nOK")
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m services.supervisor.listener <socket> [<group>]", file=sys.stderr)
        return 2
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Bounded: a stuck agent must not wedge the listener (supervisord buffers meanwhile).
        sock.settimeout(2.0)
        relay(sys.stdin, sys.stdout, sock, args[0], args[1] if len(args) == 2 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
