"""ComfyUI's ImageScaleToTotalPixels, reproduced: its target size and its resampling per method.

ComfyUI works on float images (LoadImage: ``uint8 / 255`` as float32) and scales them with
``comfy.utils.common_upscale``:

- ``lanczos``: the floats go back to 8 bits (``clip(255 * x)``, truncated), Pillow's LANCZOS
  resizes them, and the result is ``uint8 / 255`` again. The result is 8-bit exactly, so it is
  returned as ``uint8`` (the same values ComfyUI has).
- ``nearest-exact``, ``bilinear``, ``area``, ``bicubic``: ``torch.nn.functional.interpolate``
  on the float tensor (no antialiasing). The result is float: it is returned as ``float32``
  ``[H, W, 3]`` in ComfyUI's 0..1 scale (bicubic may overshoot it a little), unless every value
  is an 8-bit level (``nearest-exact`` always, any method at the same size), then as ``uint8``.

The target size is ``int(megapixels * 1024 * 1024)`` pixels before the square root, each side
rounded with Python's ``round``, as in the node.

Engines that need 8-bit pixels (diffusers, fake) take ``eight_bit(image)``: a float image
rounded to the nearest level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
# The methods whose pixels, and the megapixel values whose sizes, changed when the scaling
# became ComfyUI's (``prepare`` fingerprints name the change only for those).
_PILLOW_EQUIVALENT = frozenset({"lanczos"})
ARITHMETIC = "comfyui"


def scaled_size(width: int, height: int, megapixels: float) -> tuple[int, int]:
    """ImageScaleToTotalPixels' target size for a ``width`` x ``height`` image."""
    total = int(megapixels * 1024 * 1024)
    scale = math.sqrt(total / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def fingerprint_values(method: str, megapixels: float) -> dict[str, Any]:
    """What ``prepare``'s fingerprint adds for this scaling: nothing where the result is what
    the earlier (Pillow, unrounded total) scaling gave, so those checkpoints stay valid; a
    marker where it may differ (every method but lanczos; a megapixel value whose pixel total
    is not a whole number, so ``int`` changes it)."""
    total = megapixels * 1024 * 1024
    if method in _PILLOW_EQUIVALENT and total == int(total):
        return {}
    return {"scaling": ARITHMETIC}


def scale(image: Image.Image, size: tuple[int, int], method: str) -> np.ndarray:
    """``image`` (8-bit RGB) scaled to ``size`` (width, height) as ImageScaleToTotalPixels does:
    ``uint8 [H, W, 3]`` when the result is 8-bit exactly, else ComfyUI's ``float32`` values."""
    if method not in METHODS:
        raise ValueError(f"unknown upscale_method {method!r}; the methods are {', '.join(METHODS)}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    floats = pixels.astype(np.float32) / np.float32(255.0)  # LoadImage
    if method == "lanczos":
        eight = np.clip(np.float32(255.0) * floats, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(eight).resize(size, resample=Image.Resampling.LANCZOS), dtype=np.uint8).copy()
    import torch  # only for the methods that need it

    with torch.inference_mode():
        tensor = torch.from_numpy(floats)[None].movedim(-1, 1)
        width, height = size
        out = torch.nn.functional.interpolate(tensor, size=(height, width), mode=method)
        result = out.movedim(1, -1)[0].contiguous().numpy().copy()
    return exact_8bit(result)


def exact_8bit(image: np.ndarray) -> np.ndarray:
    """``image`` as ``uint8`` when each float is exactly an 8-bit level (``v / 255``), else unchanged."""
    if image.dtype == np.uint8:
        return image
    levels = np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)
    if np.array_equal(levels.astype(np.float32) / np.float32(255.0), image):
        return levels
    return image


def eight_bit(image: Any) -> np.ndarray:
    """A prepared image as ``uint8 [H, W, 3]``: as it is, or a float image rounded to the nearest level."""
    pixels = np.asarray(image)
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels.astype(np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)
