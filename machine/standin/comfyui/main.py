"""ComfyUI stand-in: ``python main.py --listen 127.0.0.1 --port 8188 --cpu ...``.

A small aiohttp program that imitates the subset of ComfyUI 0.3.64's HTTP/websocket API
that comfy-machine uses, with the same response shapes, status codes and log lines (built
from recordings of a real server). It needs only the standard library, aiohttp and PyYAML,
and is run from its own directory, in place of a ComfyUI checkout.

Flags: ComfyUI's whole flag set is accepted (an unknown flag exits with code 2). The ones
that do something here: ``--listen``, ``--port``, ``--tls-keyfile``/``--tls-certfile``,
``--max-upload-size``, ``--base-directory``, ``--extra-model-paths-config``,
``--output-directory``, ``--input-directory``, ``--temp-directory``, ``--cache-none``,
``--disable-metadata``, ``--disable-all-custom-nodes``/``--whitelist-custom-nodes``,
``--dont-print-server``, ``--quick-test-for-ci``, ``--verbose`` and ``--log-stdout``.
GPU flags (``--cpu``, ``--cuda-device``, ``--lowvram``, ...) are parsed and ignored: the
stand-in always reports one CPU device.

Signals: SIGINT stops cleanly (blank line, ``Stopped server``, exit 0); SIGTERM keeps its
default action and kills the process at once, as with ComfyUI. A busy port fails at bind
with asyncio's ``address already in use`` OSError traceback and exit code 1.

Test knobs, environment variables in float seconds (default 0):
``COMFYUI_STANDIN_STARTUP_DELAY`` sleeps before the port is bound, to imitate the 6-7 s that
real ComfyUI needs to start, e.g. in benchmarks of readiness checks;
``COMFYUI_STANDIN_GC_PAUSE`` is how long the garbage collection after a prompt (ComfyUI's:
after the first prompt, then at most every 10 s) holds the GIL, which real ComfyUI's does for
~0.3 s with torch loaded: requests wait meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import sys
import threading

import app_logging
import cli_args
import model_paths
import node_registry
import nodes
from aiohttp import web
from execution import PromptExecutor, prompt_worker
from server import COMFYUI_VERSION, PYTORCH_VERSION, PromptServer, memory_info

STARTUP_DELAY_ENV = "COMFYUI_STANDIN_STARTUP_DELAY"
GC_PAUSE_ENV = "COMFYUI_STANDIN_GC_PAUSE"


def apply_custom_paths(args: argparse.Namespace) -> None:
    """Extra model paths, output/input/temp directories: ComfyUI's ``apply_custom_paths``."""
    default_yaml = os.path.join(
        os.path.dirname(os.path.realpath(__file__)), "extra_model_paths.yaml"
    )
    if os.path.isfile(default_yaml):
        model_paths.load_extra_path_config(default_yaml)
    for group in args.extra_model_paths_config or []:
        for config_path in group:
            model_paths.load_extra_path_config(config_path)

    if args.output_directory:
        output_dir = os.path.abspath(args.output_directory)
        logging.info(f"Setting output directory to: {output_dir}")
        model_paths.set_output_directory(output_dir)

    # ComfyUI also searches the output directory for models its save nodes write there.
    output_dir = model_paths.get_output_directory()
    for folder in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        model_paths.add_model_folder_path(folder, os.path.join(output_dir, folder))

    if args.input_directory:
        input_dir = os.path.abspath(args.input_directory)
        logging.info(f"Setting input directory to: {input_dir}")
        model_paths.set_input_directory(input_dir)

    if args.temp_directory:
        temp_dir = os.path.join(os.path.abspath(args.temp_directory), "temp")
        logging.info(f"Setting temp directory to: {temp_dir}")
        model_paths.set_temp_directory(temp_dir)


def cleanup_temp() -> None:
    """Remove the temp directory (PreviewImage files), at start and at exit like ComfyUI."""
    shutil.rmtree(model_paths.get_temp_directory(), ignore_errors=True)


def seconds_from_env(name: str) -> float:
    """A test knob's seconds (see above); 0 when unset or not a number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        logging.warning(f"Ignoring {name}={raw!r}: not a number of seconds")
        return 0.0


def log_device_info() -> None:
    """The device lines ComfyUI prints at start, for the one CPU device."""
    ram_total, _ = memory_info()
    ram_mb = ram_total // (1024 * 1024)
    logging.info("Checkpoint files will always be loaded safely.")
    logging.info(f"Total VRAM {ram_mb} MB, total RAM {ram_mb} MB")
    logging.info(f"pytorch version: {PYTORCH_VERSION}")
    logging.info("Set vram state to: DISABLED")
    logging.info("Device: cpu")
    logging.info(f"Python version: {sys.version}")
    logging.info(f"ComfyUI version: {COMFYUI_VERSION}")


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """TLS context when both ``--tls-keyfile`` and ``--tls-certfile`` are given."""
    if not (args.tls_keyfile and args.tls_certfile):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=args.tls_certfile, keyfile=args.tls_keyfile)
    return context


async def run(args: argparse.Namespace, server: PromptServer) -> None:
    """Serve until SIGINT. A bind error propagates (traceback, exit code 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Python leaves SIGINT ignored when the process started with it ignored (e.g. a
    # background job of a non-interactive shell); ComfyUI then ignores it too.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        loop.add_signal_handler(signal.SIGINT, stop.set)

    executor = PromptExecutor(server, cache_enabled=not args.cache_none)
    threading.Thread(
        target=prompt_worker,
        args=(server.prompt_queue, server, executor, seconds_from_env(GC_PAUSE_ENV)),
        name="prompt_worker",
        daemon=True,  # SIGINT exits without waiting for a running prompt, like ComfyUI
    ).start()
    publisher = asyncio.create_task(server.publish_loop())

    delay = seconds_from_env(STARTUP_DELAY_ENV)
    if delay:
        await asyncio.sleep(delay)

    runner = web.AppRunner(server.app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        context = ssl_context(args)
        scheme = "https" if context else "http"
        verbose = not args.dont_print_server
        if verbose:
            logging.info("Starting server\n")
        for address in args.listen.split(","):
            site = web.TCPSite(runner, address, args.port, ssl_context=context)
            await site.start()
            address_print = f"[{address}]" if ":" in address else address
            if verbose:
                logging.info(f"To see the GUI go to: {scheme}://{address_print}:{args.port}")
        await stop.wait()
    finally:
        await server.close_sockets()
        publisher.cancel()
        await runner.cleanup()


def main() -> int:
    """Start the stand-in; returns the exit code (argparse exits 2 by itself)."""
    args = cli_args.parse_args()
    app_logging.setup_logger(args.verbose, use_stdout=args.log_stdout)

    base = (
        os.path.abspath(args.base_directory)
        if args.base_directory
        else os.path.dirname(os.path.realpath(__file__))
    )
    model_paths.init(base)
    apply_custom_paths(args)
    if not args.base_directory:
        model_paths.create_default_model_dirs()
    log_device_info()
    cleanup_temp()

    nodes.save_metadata = not args.disable_metadata
    # A SIGINT before the loop has its handler raises KeyboardInterrupt: same outcome.
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner() as runner:
        # The server exists before custom nodes load, as in ComfyUI, so that they can use
        # PromptServer.instance (send_sync, routes).
        server = PromptServer(runner.get_loop(), args.max_upload_size)
        node_registry.init_external_custom_nodes(
            disable_all=args.disable_all_custom_nodes, whitelist=args.whitelist_custom_nodes
        )
        if args.quick_test_for_ci:
            return 0
        server.add_routes()
        runner.run(run(args, server))
    logging.info("\nStopped server")
    cleanup_temp()
    return 0


if __name__ == "__main__":
    sys.exit(main())
