"""Command-line flags, copied from ComfyUI 0.3.64 (``python main.py --help``).

The whole real flag set is accepted so that any command line written for ComfyUI also
starts the stand-in; an unknown flag is an argparse error (exit code 2), as in ComfyUI.
Only a few flags change what the stand-in does (see ``main.py``); the rest are parsed
and ignored because they tune GPU/torch behaviour that does not exist here.
"""

from __future__ import annotations

import argparse
import os

PREVIEW_METHODS = ["none", "auto", "latent2rgb", "taesd"]
FAST_OPTIMIZATIONS = ["fp16_accumulation", "fp8_matrix_mult", "cublas_ops", "autotune"]
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _fast_feature(value: str) -> str:
    """argparse ``type`` for ``--fast``: one of ComfyUI's known optimisation names."""
    if value not in FAST_OPTIMIZATIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r}")
    return value


def _is_valid_directory(path: str) -> str:
    """argparse ``type`` for directory flags, like ComfyUI's ``is_valid_directory``."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is not a valid directory.")
    return path


def build_parser() -> argparse.ArgumentParser:
    """Return a parser with the same flags, metavars and help texts as ComfyUI 0.3.64."""
    p = argparse.ArgumentParser()
    p.add_argument(
        "--listen",
        type=str,
        default="127.0.0.1",
        metavar="IP",
        nargs="?",
        const="0.0.0.0,::",
        help="Specify the IP address to listen on (default: 127.0.0.1). You can give a list of "
        "ip addresses by separating them with a comma like: 127.2.2.2,127.3.3.3 If --listen is "
        "provided without an argument, it defaults to 0.0.0.0,:: (listens on all ipv4 and ipv6)",
    )
    p.add_argument("--port", type=int, default=8188, help="Set the listen port.")
    p.add_argument(
        "--tls-keyfile",
        type=str,
        help="Path to TLS (SSL) key file. Enables TLS, makes app accessible at https://... "
        "requires --tls-certfile to function",
    )
    p.add_argument(
        "--tls-certfile",
        type=str,
        help="Path to TLS (SSL) certificate file. Enables TLS, makes app accessible at "
        "https://... requires --tls-keyfile to function",
    )
    p.add_argument(
        "--enable-cors-header",
        type=str,
        default=None,
        metavar="ORIGIN",
        nargs="?",
        const="*",
        help="Enable CORS (Cross-Origin Resource Sharing) with optional origin or allow all "
        "with default '*'.",
    )
    p.add_argument(
        "--max-upload-size", type=float, default=100, help="Set the maximum upload size in MB."
    )
    p.add_argument(
        "--base-directory",
        type=str,
        default=None,
        help="Set the ComfyUI base directory for models, custom_nodes, input, output, temp, "
        "and user directories.",
    )
    p.add_argument(
        "--extra-model-paths-config",
        type=str,
        default=None,
        metavar="PATH",
        nargs="+",
        action="append",
        help="Load one or more extra_model_paths.yaml files.",
    )
    p.add_argument(
        "--output-directory",
        type=str,
        default=None,
        help="Set the ComfyUI output directory. Overrides --base-directory.",
    )
    p.add_argument(
        "--temp-directory",
        type=str,
        default=None,
        help="Set the ComfyUI temp directory (default is in the ComfyUI directory). Overrides "
        "--base-directory.",
    )
    p.add_argument(
        "--input-directory",
        type=str,
        default=None,
        help="Set the ComfyUI input directory. Overrides --base-directory.",
    )
    p.add_argument(
        "--auto-launch",
        action="store_true",
        help="Automatically launch ComfyUI in the default browser.",
    )
    p.add_argument(
        "--disable-auto-launch", action="store_true", help="Disable auto launching the browser."
    )
    p.add_argument(
        "--cuda-device",
        type=int,
        default=None,
        metavar="DEVICE_ID",
        help="Set the id of the cuda device this instance will use. All other devices will not "
        "be visible.",
    )
    p.add_argument(
        "--default-device",
        type=int,
        default=None,
        metavar="DEFAULT_DEVICE_ID",
        help="Set the id of the default device, all other devices will stay visible.",
    )
    cm = p.add_mutually_exclusive_group()
    cm.add_argument(
        "--cuda-malloc",
        action="store_true",
        help="Enable cudaMallocAsync (enabled by default for torch 2.0 and up).",
    )
    cm.add_argument("--disable-cuda-malloc", action="store_true", help="Disable cudaMallocAsync.")

    fp = p.add_mutually_exclusive_group()
    fp.add_argument(
        "--force-fp32",
        action="store_true",
        help="Force fp32 (If this makes your GPU work better please report it).",
    )
    fp.add_argument("--force-fp16", action="store_true", help="Force fp16.")

    unet = p.add_mutually_exclusive_group()
    unet.add_argument("--fp32-unet", action="store_true", help="Run the diffusion model in fp32.")
    unet.add_argument("--fp64-unet", action="store_true", help="Run the diffusion model in fp64.")
    unet.add_argument("--bf16-unet", action="store_true", help="Run the diffusion model in bf16.")
    unet.add_argument("--fp16-unet", action="store_true", help="Run the diffusion model in fp16")
    unet.add_argument(
        "--fp8_e4m3fn-unet", action="store_true", help="Store unet weights in fp8_e4m3fn."
    )
    unet.add_argument(
        "--fp8_e5m2-unet", action="store_true", help="Store unet weights in fp8_e5m2."
    )
    unet.add_argument(
        "--fp8_e8m0fnu-unet", action="store_true", help="Store unet weights in fp8_e8m0fnu."
    )

    vae = p.add_mutually_exclusive_group()
    vae.add_argument(
        "--fp16-vae", action="store_true", help="Run the VAE in fp16, might cause black images."
    )
    vae.add_argument("--fp32-vae", action="store_true", help="Run the VAE in full precision fp32.")
    vae.add_argument("--bf16-vae", action="store_true", help="Run the VAE in bf16.")
    p.add_argument("--cpu-vae", action="store_true", help="Run the VAE on the CPU.")

    te = p.add_mutually_exclusive_group()
    te.add_argument(
        "--fp8_e4m3fn-text-enc",
        action="store_true",
        help="Store text encoder weights in fp8 (e4m3fn variant).",
    )
    te.add_argument(
        "--fp8_e5m2-text-enc",
        action="store_true",
        help="Store text encoder weights in fp8 (e5m2 variant).",
    )
    te.add_argument(
        "--fp16-text-enc", action="store_true", help="Store text encoder weights in fp16."
    )
    te.add_argument(
        "--fp32-text-enc", action="store_true", help="Store text encoder weights in fp32."
    )
    te.add_argument(
        "--bf16-text-enc", action="store_true", help="Store text encoder weights in bf16."
    )

    p.add_argument(
        "--force-channels-last",
        action="store_true",
        help="Force channels last format when inferencing the models.",
    )
    p.add_argument(
        "--directml",
        type=int,
        nargs="?",
        metavar="DIRECTML_DEVICE",
        const=-1,
        help="Use torch-directml.",
    )
    p.add_argument(
        "--oneapi-device-selector",
        type=str,
        default=None,
        metavar="SELECTOR_STRING",
        help="Sets the oneAPI device(s) this instance will use.",
    )
    p.add_argument(
        "--disable-ipex-optimize",
        action="store_true",
        help="Disables ipex.optimize default when loading models with Intel's Extension for "
        "Pytorch.",
    )
    p.add_argument(
        "--supports-fp8-compute",
        action="store_true",
        help="ComfyUI will act like if the device supports fp8 compute.",
    )
    p.add_argument(
        "--preview-method",
        type=str,
        default="none",
        choices=PREVIEW_METHODS,
        metavar="[" + ",".join(PREVIEW_METHODS) + "]",
        help="Default preview method for sampler nodes.",
    )
    p.add_argument(
        "--preview-size",
        type=int,
        default=512,
        help="Sets the maximum preview size for sampler nodes.",
    )

    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-classic", action="store_true", help="Use the old style (aggressive) caching."
    )
    cache.add_argument(
        "--cache-lru",
        type=int,
        default=0,
        help="Use LRU caching with a maximum of N node results cached. May use more RAM/VRAM.",
    )
    cache.add_argument(
        "--cache-none",
        action="store_true",
        help="Reduced RAM/VRAM usage at the expense of executing every node for each run.",
    )

    attn = p.add_mutually_exclusive_group()
    attn.add_argument(
        "--use-split-cross-attention",
        action="store_true",
        help="Use the split cross attention optimization. Ignored when xformers is used.",
    )
    attn.add_argument(
        "--use-quad-cross-attention",
        action="store_true",
        help="Use the sub-quadratic cross attention optimization . Ignored when xformers is used.",
    )
    attn.add_argument(
        "--use-pytorch-cross-attention",
        action="store_true",
        help="Use the new pytorch 2.0 cross attention function.",
    )
    attn.add_argument("--use-sage-attention", action="store_true", help="Use sage attention.")
    attn.add_argument("--use-flash-attention", action="store_true", help="Use FlashAttention.")

    p.add_argument("--disable-xformers", action="store_true", help="Disable xformers.")

    upcast = p.add_mutually_exclusive_group()
    upcast.add_argument(
        "--force-upcast-attention",
        action="store_true",
        help="Force enable attention upcasting, please report if it fixes black images.",
    )
    upcast.add_argument(
        "--dont-upcast-attention",
        action="store_true",
        help="Disable all upcasting of attention. Should be unnecessary except for debugging.",
    )

    vram = p.add_mutually_exclusive_group()
    vram.add_argument(
        "--gpu-only",
        action="store_true",
        help="Store and run everything (text encoders/CLIP models, etc... on the GPU).",
    )
    vram.add_argument(
        "--highvram",
        action="store_true",
        help="By default models will be unloaded to CPU memory after being used. This option "
        "keeps them in GPU memory.",
    )
    vram.add_argument(
        "--normalvram",
        action="store_true",
        help="Used to force normal vram use if lowvram gets automatically enabled.",
    )
    vram.add_argument(
        "--lowvram", action="store_true", help="Split the unet in parts to use less vram."
    )
    vram.add_argument("--novram", action="store_true", help="When lowvram isn't enough.")
    vram.add_argument("--cpu", action="store_true", help="To use the CPU for everything (slow).")

    p.add_argument(
        "--reserve-vram",
        type=float,
        default=None,
        help="Set the amount of vram in GB you want to reserve for use by your OS/other "
        "software. By default some amount is reserved depending on your OS.",
    )
    p.add_argument("--async-offload", action="store_true", help="Use async weight offloading.")
    p.add_argument(
        "--force-non-blocking",
        action="store_true",
        help="Force ComfyUI to use non-blocking operations for all applicable tensors. This may "
        "improve performance on some non-Nvidia systems but can cause issues with some "
        "workflows.",
    )
    p.add_argument(
        "--default-hashing-function",
        type=str,
        choices=["md5", "sha1", "sha256", "sha512"],
        default="sha256",
        help="Allows you to choose the hash function to use for duplicate filename / contents "
        "comparison. Default is sha256.",
    )
    p.add_argument(
        "--disable-smart-memory",
        action="store_true",
        help="Force ComfyUI to agressively offload to regular ram instead of keeping models in "
        "vram when it can.",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="Make pytorch use slower deterministic algorithms when it can. Note that this "
        "might not make images deterministic in all cases.",
    )
    p.add_argument(
        "--fast",
        nargs="*",
        type=_fast_feature,
        help="Enable some untested and potentially quality deteriorating optimizations. --fast "
        "with no arguments enables everything. You can pass a list specific optimizations if "
        "you only want to enable specific ones. Current valid optimizations: "
        + " ".join(FAST_OPTIMIZATIONS),
    )
    p.add_argument(
        "--mmap-torch-files", action="store_true", help="Use mmap when loading ckpt/pt files."
    )
    p.add_argument(
        "--disable-mmap", action="store_true", help="Don't use mmap when loading safetensors."
    )
    p.add_argument("--dont-print-server", action="store_true", help="Don't print server output.")
    p.add_argument("--quick-test-for-ci", action="store_true", help="Quick test for CI.")
    p.add_argument(
        "--windows-standalone-build",
        action="store_true",
        help="Windows standalone build: Enable convenient things that most people using the "
        "standalone windows build will probably enjoy (like auto opening the page on startup).",
    )
    p.add_argument(
        "--disable-metadata", action="store_true", help="Disable saving prompt metadata in files."
    )
    p.add_argument(
        "--disable-all-custom-nodes",
        action="store_true",
        help="Disable loading all custom nodes.",
    )
    p.add_argument(
        "--whitelist-custom-nodes",
        type=str,
        nargs="+",
        default=[],
        help="Specify custom node folders to load even when --disable-all-custom-nodes is enabled.",
    )
    p.add_argument(
        "--disable-api-nodes", action="store_true", help="Disable loading all api nodes."
    )
    p.add_argument("--multi-user", action="store_true", help="Enables per-user storage.")
    p.add_argument(
        "--verbose",
        default="INFO",
        const="DEBUG",
        nargs="?",
        choices=LOG_LEVELS,
        help="Set the logging level",
    )
    p.add_argument(
        "--log-stdout",
        action="store_true",
        help="Send normal process output to stdout instead of stderr (default).",
    )
    p.add_argument(
        "--front-end-version",
        type=str,
        default="comfyanonymous/ComfyUI@latest",
        help="Specifies the version of the frontend to be used. This command needs internet "
        "connectivity to query and download available frontend implementations from GitHub "
        "releases. The version string should be in the format of: "
        '[repoOwner]/[repoName]@[version] where version is one of: "latest" or a valid '
        'version number (e.g. "1.0.0")',
    )
    p.add_argument(
        "--front-end-root",
        type=_is_valid_directory,
        default=None,
        help="The local filesystem path to the directory where the frontend is located. "
        "Overrides --front-end-version.",
    )
    p.add_argument(
        "--user-directory",
        type=_is_valid_directory,
        default=None,
        help="Set the ComfyUI user directory with an absolute path. Overrides --base-directory.",
    )
    p.add_argument(
        "--enable-compress-response-body",
        action="store_true",
        help="Enable compressing response body.",
    )
    p.add_argument(
        "--comfy-api-base",
        type=str,
        default="https://api.comfy.org",
        help="Set the base URL for the ComfyUI API. (default: https://api.comfy.org)",
    )
    p.add_argument(
        "--database-url",
        type=str,
        default=None,
        help="Specify the database URL, e.g. for an in-memory database you can use "
        "'sqlite:///:memory:'.",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); exits with code 2 on a bad flag."""
    return build_parser().parse_args(argv)
