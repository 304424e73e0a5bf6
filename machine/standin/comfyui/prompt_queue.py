"""The prompt queue and history, as ComfyUI's ``PromptQueue``.

Pending prompts form a heap ordered by their number; the running one is kept apart; a
finished prompt becomes a history entry ``{prompt, outputs, status, meta}``.
"""

from __future__ import annotations

import copy
import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

MAXIMUM_HISTORY_SIZE = 10000

QueueItem = tuple[Any, ...]  # (number, prompt_id, prompt, extra_data, outputs_to_execute)


class Server(Protocol):
    """What the executor needs from the prompt server."""

    client_id: str | None
    last_node_id: str | None
    last_prompt_id: str | None

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue a websocket message from any thread (``sid`` None = everyone)."""

    def queue_updated(self) -> None:
        """Broadcast the queue size."""


@dataclass
class ExecutionStatus:
    """Outcome stored in a history entry's ``status``."""

    status_str: str
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``status`` in ``/history``."""
        return {
            "status_str": self.status_str,
            "completed": self.completed,
            "messages": copy.deepcopy(self.messages),
        }


class PromptQueue:
    """Pending prompts (a heap by number), the running one, and the history."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[QueueItem] = []
        self.currently_running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}

    def put(self, item: QueueItem) -> None:
        """Queue a validated prompt and broadcast the new queue size."""
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.server.queue_updated()
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[QueueItem, int] | None:
        """Take the next prompt (blocking up to ``timeout``) and mark it running."""
        with self.not_empty:
            while not self.queue:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and not self.queue:
                    return None
            item = heapq.heappop(self.queue)
            item_id = self.task_counter
            self.currently_running[item_id] = copy.deepcopy(item)
            self.task_counter += 1
            self.server.queue_updated()
            return item, item_id

    def task_done(
        self, item_id: int, history_result: dict[str, Any], status: ExecutionStatus
    ) -> None:
        """Move a finished prompt to the history and broadcast the queue size."""
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            entry: dict[str, Any] = {
                "prompt": list(prompt[:5]),
                "outputs": {},
                "status": status.as_dict(),
            }
            entry.update(history_result)
            self.history[prompt[1]] = entry
            self.server.queue_updated()

    def get_current_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """``(running, pending)`` copies; pending sorted by number."""
        with self.mutex:
            return list(self.currently_running.values()), sorted(copy.deepcopy(self.queue))

    def get_tasks_remaining(self) -> int:
        """Pending plus running prompts (``exec_info.queue_remaining``)."""
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        """Drop every pending prompt."""
        with self.mutex:
            self.queue = []
            self.server.queue_updated()

    def delete_queue_item(self, function: Callable[[QueueItem], bool]) -> bool:
        """Drop the first pending prompt for which ``function`` is true."""
        with self.mutex:
            for i, item in enumerate(self.queue):
                if function(item):
                    self.queue.pop(i)
                    heapq.heapify(self.queue)
                    self.server.queue_updated()
                    return True
            return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        """One entry, or the last ``max_items`` entries (from ``offset``), oldest first."""
        with self.mutex:
            if prompt_id is not None:
                if prompt_id in self.history:
                    return {prompt_id: copy.deepcopy(self.history[prompt_id])}
                return {}
            out: dict[str, Any] = {}
            if offset < 0 and max_items is not None:
                offset = len(self.history) - max_items
            for i, key in enumerate(self.history):
                if i >= offset:
                    out[key] = self.history[key]
                    if max_items is not None and len(out) >= max_items:
                        break
            return out

    def wipe_history(self) -> None:
        """Forget all history entries."""
        with self.mutex:
            self.history = {}

    def delete_history_item(self, id_to_delete: str) -> None:
        """Forget one history entry."""
        with self.mutex:
            self.history.pop(id_to_delete, None)

    def set_flag(self, name: str, data: Any) -> None:
        """Remember a request from ``POST /free`` for the worker."""
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self, reset: bool = True) -> dict[str, Any]:
        """Return (and by default clear) the pending flags."""
        with self.mutex:
            flags = self.flags.copy()
            if reset:
                self.flags = {}
            return flags
