"""SaveImageWebsocket, the custom node ComfyUI ships in ``custom_nodes/``.

It sends full-size images over the websocket instead of saving them: each one goes out as
a binary frame in the preview format (4-byte event type 1, 4-byte image format 2 = PNG,
then the PNG bytes). No metadata is put into these images.
"""

from __future__ import annotations

import time
from typing import Any

from images import RGBImage, encode_png
from progress import ProgressBar


class SaveImageWebsocket:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "api/image"

    def save_images(self, images: list[RGBImage]) -> dict[str, Any]:
        pbar = ProgressBar(len(images))
        for step, image in enumerate(images):
            pbar.update_absolute(step, len(images), ("PNG", encode_png(image), None))
        return {}

    @classmethod
    def IS_CHANGED(cls, images: Any) -> float:
        return time.time()  # never cached: the images must be sent every time


NODE_CLASS_MAPPINGS = {
    "SaveImageWebsocket": SaveImageWebsocket,
}
