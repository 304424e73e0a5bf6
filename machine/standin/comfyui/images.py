"""Pixel data without numpy/torch/Pillow: 8-bit RGB images, a PNG writer and a box blur.

An IMAGE value flowing between nodes is a ``list[RGBImage]`` (one entry per batch item),
standing in for ComfyUI's ``[B, H, W, C]`` float tensor.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class RGBImage:
    """One image: ``pixels`` holds ``height`` rows of ``width * 3`` bytes (R, G, B)."""

    width: int
    height: int
    pixels: bytes

    @classmethod
    def solid(cls, width: int, height: int, color: int) -> RGBImage:
        """An image filled with ``color`` given as ``0xRRGGBB`` (EmptyImage's encoding)."""
        rgb = bytes(((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF))
        return cls(width, height, rgb * (width * height))

    def __repr__(self) -> str:
        # Shown in execution_error "current_inputs"; the pixel bytes would be noise there.
        return f"RGBImage({self.width}x{self.height})"


@dataclass(frozen=True)
class Latent:
    """Stand-in for a latent batch: only its shape (pixel size / 8, like SD latents)."""

    batch_size: int
    width: int
    height: int


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(
    image: RGBImage, text: dict[str, str] | None = None, compress_level: int = 4
) -> bytes:
    """Encode an image as an 8-bit RGB PNG, with optional ``tEXt`` chunks (like SaveImage)."""
    stride = image.width * 3
    px = image.pixels
    # Filter type 0 (None) before each row.
    raw = b"".join(b"\x00" + px[y * stride : (y + 1) * stride] for y in range(image.height))
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        parts.append(
            _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
        )
    parts.append(_chunk(b"IDAT", zlib.compress(raw, compress_level)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def _blur_line(values: bytes, radius: int) -> bytes:
    """Mean over a window of ``2 * radius + 1`` with reflected edges, in O(len)."""
    n = len(values)
    r = min(radius, n - 1)
    if r <= 0:
        return values
    size = 2 * r + 1
    # Reflect padding (as torch's 'reflect'): the edge sample is not repeated.
    padded = values[r:0:-1] + values + values[-2 : -2 - r : -1]
    sums = [0, *accumulate(padded)]
    half = size // 2
    return bytes((b - a + half) // size for a, b in zip(sums, sums[size:], strict=False))


def box_blur(image: RGBImage, radius: int) -> RGBImage:
    """Blur with a separable box filter of ``radius``; one channel plane at a time.

    The real ImageBlur uses a very flat Gaussian over the same window, so a box filter is a
    close match. Work is proportional to the pixel count, so a big image costs seconds of
    CPU, as it does in ComfyUI on CPU.
    """
    w, h = image.width, image.height
    out = bytearray(w * h * 3)
    for channel in range(3):
        plane = image.pixels[channel::3]
        rows = b"".join(_blur_line(plane[y * w : (y + 1) * w], radius) for y in range(h))
        blurred = bytearray(w * h)
        for x in range(w):
            blurred[x::w] = _blur_line(rows[x::w], radius)
        out[channel::3] = blurred
    return RGBImage(w, h, bytes(out))
