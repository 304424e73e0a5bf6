"""The executor and its worker thread (ComfyUI's ``execution.py`` and ``prompt_worker``).

Execution runs in one worker thread, like ComfyUI's, so a slow node never blocks the HTTP
server. Node order, websocket messages (``execution_start``, ``execution_cached``,
``progress_state``, ``executing``, ``executed``, ``execution_success``/``_error``/
``_interrupted``), history entries and output caching follow ComfyUI's. The cache is
ComfyUI's classic one: results of the latest prompt are kept and a node whose class, widget
values and inputs are unchanged is not run again (``--cache-none`` turns this off).
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodes import NODE_CLASS_MAPPINGS
from progress import (
    InterruptProcessingException,
    interrupt_processing,
    set_progress_hook,
    throw_exception_if_processing_interrupted,
)
from prompt_queue import ExecutionStatus, PromptQueue, Server
from validation import full_type_name, get_input_info, is_link

# ComfyUI collects garbage after a prompt at most this often (its first prompt always).
GC_COLLECT_INTERVAL_S = 10.0

# Binary websocket event types (ComfyUI's BinaryEventTypes) and image formats.
PREVIEW_IMAGE = 1
PNG_FORMAT = 2


@dataclass
class CacheEntry:
    """A node's outputs and its UI info (``{"meta", "output"}``) from an earlier run."""

    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


class OutputCache:
    """ComfyUI's classic cache: a node result is reused while its inputs are unchanged."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._entries: dict[str, CacheEntry] = {}
        self._signatures: dict[str, str] = {}

    def set_prompt(self, prompt: dict[str, Any]) -> None:
        """Compute the signature of every node and drop results no node can use."""
        memo: dict[str, str] = {}
        self._signatures = {node_id: _signature(prompt, node_id, memo) for node_id in prompt}
        wanted = set(self._signatures.values()) if self.enabled else set()
        self._entries = {k: v for k, v in self._entries.items() if k in wanted}

    def get(self, node_id: str) -> CacheEntry | None:
        """The cached result for a node of the current prompt, if any."""
        return self._entries.get(self._signatures.get(node_id, ""))

    def set(self, node_id: str, entry: CacheEntry) -> None:
        """Store a node's result (a no-op with ``--cache-none``)."""
        if self.enabled:
            self._entries[self._signatures[node_id]] = entry


def _is_changed(class_def: type, node_id: str, inputs: dict[str, Any]) -> str:
    """A node's ``IS_CHANGED`` value; a fresh value (never cached) when it fails."""
    if not hasattr(class_def, "IS_CHANGED"):
        return ""
    class_inputs = class_def.INPUT_TYPES()
    args = {
        k: v
        for k, v in inputs.items()
        if not is_link(v)
        and get_input_info(class_def, k, class_inputs)[1] in ("required", "optional")
    }
    try:
        return repr(class_def.IS_CHANGED(**args))
    except Exception:
        return uuid.uuid4().hex  # ComfyUI uses NaN here: it never equals anything.


def _signature(prompt: dict[str, Any], node_id: str, memo: dict[str, str]) -> str:
    """Key of a node: class, IS_CHANGED, widget values and the keys of linked nodes."""
    if node_id in memo:
        return memo[node_id]
    node = prompt[node_id]
    class_def = NODE_CLASS_MAPPINGS[node["class_type"]]
    parts: list[Any] = [node["class_type"], _is_changed(class_def, node_id, node["inputs"])]
    if getattr(class_def, "NOT_IDEMPOTENT", False):
        parts.append(node_id)
    for name in sorted(node["inputs"]):
        value = node["inputs"][name]
        if is_link(value) and value[0] in prompt:
            parts.append([name, "link", _signature(prompt, value[0], memo), value[1]])
        else:
            parts.append([name, value])
    memo[node_id] = json.dumps(parts, default=repr)
    return memo[node_id]


class ExecutionList:
    """Nodes left to run, ordered like ComfyUI's ``ExecutionList`` (outputs first when ready)."""

    def __init__(self, prompt: dict[str, Any], is_cached: Callable[[str], bool]) -> None:
        self.prompt = prompt
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, bool]] = {}

    def add_node(self, node_id: str) -> None:
        """Add a node and its uncached dependencies."""
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            uid = stack.pop()
            if uid in self.pending:
                continue
            self.pending[uid] = True
            self.block_count[uid] = 0
            self.blocking[uid] = {}
            for value in self.prompt[uid]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], uid))
        for from_id, to_id in links:
            if not self.is_cached(from_id) and to_id not in self.blocking[from_id]:
                self.blocking[from_id][to_id] = True
                self.block_count[to_id] += 1

    def is_empty(self) -> bool:
        """Whether every node has run."""
        return not self.pending

    def _is_output(self, node_id: str) -> bool:
        class_def = NODE_CLASS_MAPPINGS[self.prompt[node_id]["class_type"]]
        return getattr(class_def, "OUTPUT_NODE", False) is True

    def next_node(self) -> str:
        """Pick the next runnable node; raises on a dependency cycle."""
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            raise RuntimeError("Dependency cycle detected")
        for n in ready:
            if self._is_output(n):
                return n
        for n in ready:  # feeds an output directly (VAEDecode -> Save)
            if any(self._is_output(b) for b in self.blocking[n]):
                return n
        for n in ready:  # two steps from an output (VAELoader -> VAEDecode -> Save)
            if any(self._is_output(b1) for b in self.blocking[n] for b1 in self.blocking[b]):
                return n
        return ready[0]

    def complete(self, node_id: str) -> None:
        """Mark a node done and unblock the nodes waiting for it."""
        del self.pending[node_id]
        for blocked in self.blocking.pop(node_id):
            self.block_count[blocked] -= 1


def format_value(x: Any) -> Any:
    """How an input value appears in ``execution_error.current_inputs``."""
    if x is None or isinstance(x, int | float | bool | str):
        return x
    if isinstance(x, dict | list):
        try:
            json.dumps(x)
            return x
        except (TypeError, ValueError):
            pass
    return str(x)


class ProgressState:
    """Per-node progress of the running prompt, sent as ``progress_state`` messages."""

    def __init__(self, server: Server, prompt_id: str) -> None:
        self.server = server
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict[str, Any]] = {}

    def _node(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _send(self) -> None:
        active = {
            node_id: {
                "value": st["value"],
                "max": st["max"],
                "state": st["state"],
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, st in self.nodes.items()
            if st["state"] != "pending"
        }
        self.server.send_sync(
            "progress_state", {"prompt_id": self.prompt_id, "nodes": active}, self.server.client_id
        )

    def start(self, node_id: str) -> None:
        """A node starts running."""
        self._node(node_id).update(state="running", value=0.0, max=1.0)
        self._send()

    def update(self, node_id: str, value: float, max_value: float) -> None:
        """A node reports progress."""
        self._node(node_id).update(state="running", value=value, max=max_value)
        self._send()

    def finish(self, node_id: str) -> None:
        """A node is done (or came from the cache)."""
        st = self._node(node_id)
        st.update(state="finished", value=st["max"])
        self._send()


class PromptExecutor:
    """Runs one prompt at a time in the worker thread; keeps the output cache between runs."""

    def __init__(self, server: Server, cache_enabled: bool = True) -> None:
        self.server = server
        self.cache = OutputCache(cache_enabled)
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.success = True
        self.history_result: dict[str, Any] = {}

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        """Record a status message for the history and send it to the client."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    def execute(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any],
        execute_outputs: list[str],
    ) -> None:
        """Run the nodes needed for ``execute_outputs``; sets ``success``/``history_result``."""
        interrupt_processing(False)
        self.server.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        self.cache.set_prompt(prompt)
        cached_nodes = [node_id for node_id in prompt if self.cache.get(node_id) is not None]
        self.add_message(
            "execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False
        )

        progress = ProgressState(self.server, prompt_id)
        results: dict[str, tuple[Any, ...]] = {}
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        current_outputs = list(prompt)
        execution_list = ExecutionList(prompt, lambda n: self.cache.get(n) is not None)
        for node_id in execute_outputs:
            execution_list.add_node(node_id)

        while not execution_list.is_empty():
            node_id = execution_list.next_node()
            error = self._execute_node(
                prompt, prompt_id, node_id, extra_data, results, ui_outputs, progress
            )
            if error is not None:
                self.success = False
                self._handle_error(prompt_id, prompt, current_outputs, executed, *error)
                break
            executed.append(node_id)
            execution_list.complete(node_id)
        else:
            self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)

        self.history_result = {
            "outputs": {k: v["output"] for k, v in ui_outputs.items()},
            "meta": {k: v["meta"] for k, v in ui_outputs.items()},
        }
        self.server.last_node_id = None

    def _get_input_data(
        self,
        class_def: type,
        node_id: str,
        inputs: dict[str, Any],
        results: dict[str, tuple[Any, ...]],
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
    ) -> dict[str, Any]:
        valid_inputs = class_def.INPUT_TYPES()
        data: dict[str, Any] = {}
        for name, value in inputs.items():
            _, category, _ = get_input_info(class_def, name, valid_inputs)
            if is_link(value):
                source = results.get(value[0])
                if source is None:
                    cached = self.cache.get(value[0])
                    source = cached.outputs if cached is not None else None
                index = int(value[1])
                if source is not None and index < len(source):
                    data[name] = source[index]
            elif category is not None:
                data[name] = value
        for name, kind in valid_inputs.get("hidden", {}).items():
            if kind == "PROMPT":
                data[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                data[name] = extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                data[name] = node_id
        return data

    def _execute_node(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        node_id: str,
        extra_data: dict[str, Any],
        results: dict[str, tuple[Any, ...]],
        ui_outputs: dict[str, dict[str, Any]],
        progress: ProgressState,
    ) -> tuple[dict[str, Any], BaseException] | None:
        """Run (or take from the cache) one node; returns ``(error_details, exc)`` on failure."""
        server = self.server
        class_type = prompt[node_id]["class_type"]
        class_def = NODE_CLASS_MAPPINGS[class_type]

        cached = self.cache.get(node_id)
        if cached is not None:
            if server.client_id is not None:
                cached_ui = cached.ui or {}
                server.send_sync(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": cached_ui.get("output"),
                        "prompt_id": prompt_id,
                    },
                    server.client_id,
                )
            if cached.ui is not None:
                ui_outputs[node_id] = cached.ui
            progress.finish(node_id)
            results[node_id] = cached.outputs
            return None

        progress.start(node_id)
        input_data: dict[str, Any] | None = None
        try:
            input_data = self._get_input_data(
                class_def, node_id, prompt[node_id]["inputs"], results, prompt, extra_data
            )
            if server.client_id is not None:
                server.last_node_id = node_id
                server.send_sync(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                    server.client_id,
                )
            throw_exception_if_processing_interrupted()
            set_progress_hook(self._progress_hook(prompt_id, node_id, progress))
            try:
                obj = class_def()
                returned = getattr(obj, class_def.FUNCTION)(**input_data)
            finally:
                set_progress_hook(None)

            output_ui: dict[str, Any] = {}
            outputs: tuple[Any, ...] = ()
            if isinstance(returned, dict):
                output_ui = returned.get("ui") or {}
                outputs = tuple(returned.get("result") or ())
            elif returned is not None:
                outputs = tuple(returned)

            ui_info: dict[str, Any] | None = None
            if output_ui:
                ui_info = {
                    "meta": {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    },
                    "output": output_ui,
                }
                ui_outputs[node_id] = ui_info
                if server.client_id is not None:
                    server.send_sync(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": output_ui,
                            "prompt_id": prompt_id,
                        },
                        server.client_id,
                    )
            results[node_id] = outputs
            self.cache.set(node_id, CacheEntry(outputs, ui_info))
        except InterruptProcessingException as iex:
            logging.info("Processing interrupted")
            return {"node_id": node_id}, iex
        except Exception as ex:
            typ, _, tb = sys.exc_info()
            assert typ is not None
            formatted = {k: [format_value(v)] for k, v in (input_data or {}).items()}
            logging.error(f"!!! Exception during processing !!! {ex}")
            logging.error(traceback.format_exc())
            return {
                "node_id": node_id,
                "exception_message": f"{ex}\n",
                "exception_type": full_type_name(typ),
                "traceback": traceback.format_tb(tb),
                "current_inputs": formatted,
            }, ex
        progress.finish(node_id)
        return None

    def _progress_hook(
        self, prompt_id: str, node_id: str, progress: ProgressState
    ) -> Callable[[int, int, Any], None]:
        server = self.server

        def hook(value: int, total: int, preview: Any) -> None:
            throw_exception_if_processing_interrupted()
            progress.update(node_id, value, total)
            server.send_sync(
                "progress",
                {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                server.client_id,
            )
            if preview is not None and preview[0] == "PNG":
                # Legacy preview frame: event PREVIEW_IMAGE, format PNG, then the bytes.
                server.send_sync(
                    PREVIEW_IMAGE, PNG_FORMAT.to_bytes(4, "big") + preview[1], server.client_id
                )

        return hook

    def _handle_error(
        self,
        prompt_id: str,
        prompt: dict[str, Any],
        current_outputs: list[str],
        executed: list[str],
        error: dict[str, Any],
        ex: BaseException,
    ) -> None:
        node_id = error["node_id"]
        mes: dict[str, Any] = {
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": prompt[node_id]["class_type"],
            "executed": list(executed),
        }
        if isinstance(ex, InterruptProcessingException):
            self.add_message("execution_interrupted", mes, broadcast=True)
            return
        mes.update(
            exception_message=error["exception_message"],
            exception_type=error["exception_type"],
            traceback=error["traceback"],
            current_inputs=error["current_inputs"],
            current_outputs=list(current_outputs),
        )
        self.add_message("execution_error", mes, broadcast=False)


def hold_gil(seconds: float) -> None:
    """Keep every other thread of the process waiting for ``seconds``, as ComfyUI's
    ``gc.collect()`` of a heap with torch loaded does (~0.3 s on 2 vCPUs)."""
    if seconds <= 0:
        return
    interval = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 1.0)  # a thread that waits for the GIL asks for it after this
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pass
    finally:
        sys.setswitchinterval(interval)


def prompt_worker(
    queue: PromptQueue, server: Server, executor: PromptExecutor, gc_pause: float = 0.0
) -> None:
    """Worker thread body: run queued prompts forever, one after the other; after a prompt,
    collect garbage on ComfyUI's cadence, ``gc_pause`` seconds long."""
    last_gc_collect = 0.0
    need_gc = False
    while True:
        timeout = 1000.0
        if need_gc:
            timeout = max(GC_COLLECT_INTERVAL_S - (time.perf_counter() - last_gc_collect), 0.0)
        queue_item = queue.get(timeout=timeout)
        if queue_item is None:
            if need_gc:
                last_gc_collect, need_gc = collect_garbage(last_gc_collect, gc_pause)
            continue
        need_gc = True
        item, item_id = queue_item
        started = time.perf_counter()
        prompt_id = item[1]
        server.last_prompt_id = prompt_id
        try:
            executor.execute(item[2], prompt_id, item[3], item[4])
        except Exception:
            # Keep the worker alive whatever a prompt does; record it as failed.
            logging.exception("!!! Exception during processing !!!")
            executor.success = False
            executor.history_result = {"outputs": {}, "meta": {}}
        queue.task_done(
            item_id,
            executor.history_result,
            ExecutionStatus(
                status_str="success" if executor.success else "error",
                completed=executor.success,
                messages=executor.status_messages,
            ),
        )
        if server.client_id is not None:
            server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, server.client_id)
        elapsed = time.perf_counter() - started
        if elapsed > 600:
            logging.info(f"Prompt executed in {time.strftime('%H:%M:%S', time.gmtime(elapsed))}")
        else:
            logging.info(f"Prompt executed in {elapsed:.2f} seconds")
        queue.get_flags()  # /free requests: nothing to unload here.
        last_gc_collect, need_gc = collect_garbage(last_gc_collect, gc_pause)


def collect_garbage(last_gc_collect: float, gc_pause: float) -> tuple[float, bool]:
    """ComfyUI's rule: collect when the last collection is over 10 s old (so always after the
    first prompt). Returns the new (last collection, still needed)."""
    now = time.perf_counter()
    if now - last_gc_collect <= GC_COLLECT_INTERVAL_S:
        return last_gc_collect, True
    gc.collect()
    hold_gil(gc_pause)
    return now, False
