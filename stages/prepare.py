"""Stage ``prepare``: load the job's images once, validate them, scale image1.

This is ComfyUI's LoadImage (EXIF orientation applied, RGB) and ImageScaleToTotalPixels
(image1 scaled to ``megapixels`` x 1024 x 1024 pixels, keeping the aspect ratio) on Pillow,
for every engine. Its output is ``{"images": [uint8 ndarray[H, W, 3], ...]}``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from config import StageParameters
from stages.errors import PermanentError

RESAMPLING = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(PermanentError):
    """An input image that cannot be used; the message names the file."""


def load_image(path: Path, label: str, max_pixels: int) -> Image.Image:
    """Open, fully decode and orient an image, refusing bombs and truncated files."""
    if path.stat().st_size == 0:
        raise ImageError(f"{label} ({path.name}): the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageError(f"{label} ({path.name}): {width}x{height} is more than "
                                     f"max_image_pixels={max_pixels}")
                probe.load()
                image = ImageOps.exif_transpose(probe).convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label} ({path.name}): refused as a decompression bomb, more than "
                         f"max_image_pixels={max_pixels} ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} ({path.name}): not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label} ({path.name}): damaged or truncated image ({exc})") from exc
    if image.width < 8 or image.height < 8:
        raise ImageError(f"{label} ({path.name}): {image.width}x{image.height} is too small (8x8 at least)")
    return image


def scaled_size(width: int, height: int, megapixels: float) -> tuple[int, int]:
    """ImageScaleToTotalPixels' target size."""
    from stages import resize
    return resize.scaled_size(width, height, megapixels)


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).copy()


def prepare(paths: Sequence[tuple[str, Path]], params: StageParameters, max_pixels: int) -> dict:
    """Load ``(label, path)`` pairs; image1 first. Returns the prepare payload."""
    images = []
    for index, (label, path) in enumerate(paths):
        image = load_image(path, label, max_pixels)
        if index == 0:
            from stages import resize
            size = scaled_size(image.width, image.height, params.megapixels)
            images.append(resize.scale(image, size, params.upscale_method))  # ComfyUI's values (stages/resize.py)
            continue
        images.append(to_array(image))
    return {"images": images}
