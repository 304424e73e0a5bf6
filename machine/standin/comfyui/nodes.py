"""Built-in nodes, written against ComfyUI's node class protocol.

Each class has ``INPUT_TYPES`` (a classmethod), ``RETURN_TYPES``, ``FUNCTION``,
``CATEGORY`` and optionally ``OUTPUT_NODE``/``DESCRIPTION``/``OUTPUT_TOOLTIPS``; input specs
are copied from the recorded ``/object_info`` of ComfyUI 0.3.64 so the API shows the same
thing. Model combos are filled from the model folders when ``INPUT_TYPES`` is called, i.e.
at request time.

There are no models here: loaders check that the file exists and (for safetensors) that
its header parses, then hand on a :class:`ModelFile` handle; KSampler walks its steps and
returns the latent unchanged; VAEDecode gives a grey image of the latent's pixel size.
"""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import model_paths
from images import Latent, RGBImage, box_blur, encode_png
from progress import ProgressBar, throw_exception_if_processing_interrupted

MAX_RESOLUTION = 16384

# Set by main.py from --disable-metadata; SaveImage then writes no prompt into the PNG.
save_metadata: bool = True


class SafetensorError(Exception):
    """Raised for a ``.safetensors`` file whose header does not parse."""


# Reported as exception_type in execution_error; clients see the same type name as with
# ComfyUI, whose safetensors library raises this class from its Rust extension.
SafetensorError.__module__ = "safetensors._safetensors_rust"

_SAFETENSORS_MAX_HEADER = 100_000_000


def check_model_file(path: str) -> dict[str, Any]:
    """Validate a model file the way loading it would; returns the safetensors header.

    Only safetensors can be checked without torch; other formats are accepted as they are.
    """
    if os.path.splitext(path)[1].lower() not in (".safetensors", ".sft"):
        return {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorError("Error while deserializing header: header too small")
        (length,) = struct.unpack("<Q", head)
        if length > _SAFETENSORS_MAX_HEADER:
            raise SafetensorError("Error while deserializing header: header too large")
        raw = f.read(length)
    if len(raw) < length:
        raise SafetensorError("Error while deserializing header: invalid header length")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorError(
            f"Error while deserializing header: invalid UTF-8 in header: {e}"
        ) from e
    if not text.startswith("{"):
        raise SafetensorError("Error while deserializing header: invalid header start")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise SafetensorError(
            f"Error while deserializing header: invalid JSON in header: {e}"
        ) from e
    return header if isinstance(header, dict) else {}


@dataclass(frozen=True)
class ModelFile:
    """Handle for a loaded model (MODEL, CLIP or VAE): what it is and where it came from."""

    kind: str
    path: str
    loras: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"<{self.kind} {os.path.basename(self.path) or self.path}>"


@dataclass(frozen=True)
class Conditioning:
    """Handle for an encoded prompt."""

    text: str


class EmptyImage:
    """A batch of images of one colour (``color`` is ``0xRRGGBB``)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
                ),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(
        self, width: int, height: int, batch_size: int = 1, color: int = 0
    ) -> tuple[list[RGBImage]]:
        image = RGBImage.solid(width, height, color)
        return ([image] * batch_size,)


class SaveImage:
    """Writes PNGs to the output directory as ``{prefix}_{counter:05}_.png``."""

    output_type: ClassVar[str] = "output"
    prefix_append: ClassVar[str] = ""
    compress_level: ClassVar[int] = 4

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "The prefix for the file to save. This may include formatting "
                        "information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to "
                        "include values from nodes.",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def _directory(self) -> str:
        return model_paths.get_output_directory()

    def save_images(
        self,
        images: list[RGBImage],
        filename_prefix: str = "ComfyUI",
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        filename_prefix += self.prefix_append
        first = images[0]
        folder, filename, counter, subfolder, _ = model_paths.get_save_image_path(
            filename_prefix, self._directory(), first.width, first.height
        )
        text: dict[str, str] = {}
        if save_metadata:
            if prompt is not None:
                text["prompt"] = json.dumps(prompt)
            for key, value in (extra_pnginfo or {}).items():
                text[key] = json.dumps(value)
        results = []
        for batch_number, image in enumerate(images):
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            with open(os.path.join(folder, file), "wb") as f:
                f.write(encode_png(image, text, self.compress_level))
            results.append({"filename": file, "subfolder": subfolder, "type": self.output_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Like SaveImage, into the temp directory with a random prefix suffix."""

    output_type: ClassVar[str] = "temp"
    compress_level: ClassVar[int] = 1

    def __init__(self) -> None:
        # Random suffix so previews of different runs do not overwrite each other.
        self.prefix_append = "_temp_" + "".join(
            random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5)
        )

    def _directory(self) -> str:
        return model_paths.get_temp_directory()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }


class ImageBlur:
    """Box blur of ``blur_radius``; listed like ComfyUI's V3 node of the same name."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "image": ("IMAGE", {}),
                "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"
    CATEGORY = "image/postprocessing"

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict[str, Any]:
        # V3 nodes have their own key order and extra flags in /object_info.
        inputs = cls.INPUT_TYPES()
        return {
            "input": inputs,
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_is_list": [False],
            "output_name": list(cls.RETURN_TYPES),
            "output_tooltips": [None],
            "name": "ImageBlur",
            "display_name": None,
            "description": "",
            "python_module": "comfy_extras.nodes_post_processing",
            "category": cls.CATEGORY,
            "output_node": False,
            "deprecated": False,
            "experimental": False,
            "api_node": False,
        }

    def blur(self, image: list[RGBImage], blur_radius: int, sigma: float) -> tuple[list[RGBImage]]:
        out = []
        for item in image:
            throw_exception_if_processing_interrupted()
            out.append(box_blur(item, blur_radius))
        return (out,)


class CheckpointLoaderSimple:
    """Resolves a checkpoint and checks its header; hands on MODEL, CLIP and VAE handles."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "ckpt_name": (
                    model_paths.get_filename_list("checkpoints"),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = (
        "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    )

    def load_checkpoint(self, ckpt_name: str) -> tuple[ModelFile, ModelFile, ModelFile]:
        path = model_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        check_model_file(path)
        return ModelFile("MODEL", path), ModelFile("CLIP", path), ModelFile("VAE", path)


class UNETLoader:
    """Resolves a diffusion model file and checks its header."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "unet_name": (model_paths.get_filename_list("diffusion_models"),),
                "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"

    def load_unet(self, unet_name: str, weight_dtype: str) -> tuple[ModelFile]:
        path = model_paths.get_full_path_or_raise("diffusion_models", unet_name)
        check_model_file(path)
        return (ModelFile("MODEL", path),)


class LoraLoader:
    """Resolves a LoRA file and records it on the model and CLIP handles."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
                "lora_name": (
                    model_paths.get_filename_list("loras"),
                    {"tooltip": "The name of the LoRA."},
                ),
                "strength_model": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -100.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "How strongly to modify the diffusion model. This value can "
                        "be negative.",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -100.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "How strongly to modify the CLIP model. This value can be "
                        "negative.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = (
        "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents "
        "are denoised such as applying styles. Multiple LoRA nodes can be linked together."
    )

    def load_lora(
        self,
        model: ModelFile,
        clip: ModelFile,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
    ) -> tuple[ModelFile, ModelFile]:
        if strength_model == 0 and strength_clip == 0:
            return model, clip  # ComfyUI skips loading a LoRA that would change nothing.
        path = model_paths.get_full_path_or_raise("loras", lora_name)
        check_model_file(path)
        return (
            ModelFile(model.kind, model.path, (*model.loras, lora_name)),
            ModelFile(clip.kind, clip.path, (*clip.loras, lora_name)),
        )


class VAELoader:
    """Resolves a VAE file (or ``pixel_space``)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae_name": ([*model_paths.get_filename_list("vae"), "pixel_space"],)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name: str) -> tuple[ModelFile]:
        if vae_name == "pixel_space":
            return (ModelFile("VAE", "pixel_space"),)
        path = model_paths.get_full_path_or_raise("vae", vae_name)
        check_model_file(path)
        return (ModelFile("VAE", path),)


class CLIPTextEncode:
    """Wraps the prompt text as a CONDITIONING handle."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The text to be encoded.",
                    },
                ),
                "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = (
        "A conditioning containing the embedded text used to guide the diffusion model.",
    )
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = (
        "Encodes a text prompt using a CLIP model into an embedding that can be used to guide "
        "the diffusion model towards generating specific images."
    )

    def encode(self, clip: ModelFile, text: str) -> tuple[Conditioning]:
        return (Conditioning(text),)


SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]


class KSampler:
    """Reports one progress step per ``steps`` and returns the latent as it came."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "The number of steps used in the denoising process.",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "The Classifier-Free Guidance scale balances creativity and "
                        "adherence to the prompt. Higher values result in images more closely "
                        "matching the prompt however too high values will negatively impact "
                        "quality.",
                    },
                ),
                "sampler_name": (
                    SAMPLERS,
                    {
                        "tooltip": "The algorithm used when sampling, this can affect the "
                        "quality, speed, and style of the generated output."
                    },
                ),
                "scheduler": (
                    SCHEDULERS,
                    {
                        "tooltip": "The scheduler controls how noise is gradually removed to "
                        "form the image."
                    },
                ),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes you want to "
                        "include in the image."
                    },
                ),
                "negative": (
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes you want to "
                        "exclude from the image."
                    },
                ),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The amount of denoising applied, lower values will maintain "
                        "the structure of the initial image allowing for image to image "
                        "sampling.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = (
        "Uses the provided model, positive and negative conditioning to denoise the latent image."
    )

    def sample(
        self,
        model: ModelFile,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: dict[str, Latent],
        denoise: float = 1.0,
    ) -> tuple[dict[str, Latent]]:
        # No sampling happens; the steps still report progress over the websocket and can
        # be interrupted, as a real sampler's would.
        bar = ProgressBar(steps)
        for _ in range(steps):
            bar.update(1)
        return ({"samples": latent_image["samples"]},)


class EmptyLatentImage:
    """A latent batch of the given pixel size (stored as size / 8, like SD latents)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "width": (
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The width of the latent images in pixels.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The height of the latent images in pixels.",
                    },
                ),
                "batch_size": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 4096,
                        "tooltip": "The number of latent images in the batch.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    def generate(self, width: int, height: int, batch_size: int = 1) -> tuple[dict[str, Latent]]:
        return ({"samples": Latent(batch_size, width // 8, height // 8)},)


class VAEDecode:
    """A grey image batch of the latent's pixel size."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae: ModelFile, samples: dict[str, Latent]) -> tuple[list[RGBImage]]:
        latent = samples["samples"]
        image = RGBImage.solid(latent.width * 8, latent.height * 8, 0x808080)
        return ([image] * latent.batch_size,)


# In the order of ComfyUI's own mapping, so /object_info lists them the same way.
NODE_CLASS_MAPPINGS: dict[str, type] = {
    "KSampler": KSampler,
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "CLIPTextEncode": CLIPTextEncode,
    "VAEDecode": VAEDecode,
    "VAELoader": VAELoader,
    "EmptyLatentImage": EmptyLatentImage,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "EmptyImage": EmptyImage,
    "LoraLoader": LoraLoader,
    "UNETLoader": UNETLoader,
    "ImageBlur": ImageBlur,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "KSampler": "KSampler",
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "VAEDecode": "VAE Decode",
    "VAELoader": "Load VAE",
    "EmptyLatentImage": "Empty Latent Image",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "LoraLoader": "Load LoRA",
    "UNETLoader": "Load Diffusion Model",
}

# Web directories of custom nodes, name -> absolute path (served under /extensions/<name>).
EXTENSION_WEB_DIRS: dict[str, str] = {}
