"""Stage ``prepare``: load the job's images once, validate them, scale image1.

This is ComfyUI's LoadImage (EXIF orientation applied, RGB) and ImageScaleToTotalPixels
(image1 scaled to ``megapixels`` x 1024 x 1024 pixels, keeping the aspect ratio) on Pillow,
for every engine. Its output is ``{"images": [uint8 ndarray[H, W, 3], ...]}``. Every picture
is made 8-bit sRGB first (``stages/colour.py``: bit depths, modes, ICC profiles).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from config import StageParameters
from stages.colour import MAX_PNG_CHUNK, PictureError, source_bits, to_srgb
from stages.errors import PermanentError
from stages.formats import unreadable_reason

RESAMPLING = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(PermanentError):
    """An input image that cannot be used; the message names the file."""


log = logging.getLogger(__name__)


def load_image(path: Path, label: str, max_pixels: int) -> Image.Image:
    """Open, fully decode and orient an image as 8-bit sRGB, refusing bombs and truncated files."""
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
                bits = source_bits(probe)
                probe.load()
                image, colour = to_srgb(probe, bits)
    except ImageError:
        raise
    except PictureError as exc:
        raise ImageError(f"{label} ({path.name}): {exc}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label} ({path.name}): refused as a decompression bomb, more than "
                         f"max_image_pixels={max_pixels} ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} ({path.name}): {unreadable_reason(path.name)}") from exc
    except ValueError as exc:
        if "MAX_TEXT_CHUNK" in str(exc):
            raise ImageError(f"{label} ({path.name}): an embedded PNG chunk (ICC profile or text) is larger "
                             f"than the limit of {MAX_PNG_CHUNK // 2**20} MiB") from exc
        raise ImageError(f"{label} ({path.name}): damaged or truncated image ({exc})") from exc
    except (OSError, SyntaxError) as exc:
        raise ImageError(f"{label} ({path.name}): damaged or truncated image ({exc})") from exc
    if colour.note:
        log.warning("%s (%s): %s", label, path.name, colour.note)
    if image.width < 8 or image.height < 8:
        raise ImageError(f"{label} ({path.name}): {image.width}x{image.height} is too small (8x8 at least)")
    return image


MIN_SCALED_SIDE = 16  # the engines work in 16-pixel units (VAE factor 8 x 2x2 patches)


def check_proportions(size: tuple[int, int], label: str, file_name: str, max_ratio: float, engine_ratio: float,
                      engine_why: str, megapixels: Optional[float] = None) -> None:
    """Refuse an image the pipeline cannot take, naming the limit: longer than ``max_ratio``
    (the setting) or than the engine takes (``engine_ratio`` and why), or, for image1 scaled to
    ``megapixels``, a short side under 16 pixels."""
    width, height = size
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise ImageError(f"{label} ({file_name}): {width}x{height} is {ratio:.3g}:1, more than "
                         f"max_aspect_ratio={max_ratio:g}")
    if ratio >= engine_ratio:
        raise ImageError(f"{label} ({file_name}): {width}x{height} is {ratio:.3g}:1; the engine takes "
                         f"less than {engine_ratio:g}:1 ({engine_why})")
    if megapixels is not None:
        scaled = scaled_size(width, height, megapixels)
        if min(scaled) < MIN_SCALED_SIDE:
            raise ImageError(f"{label} ({file_name}): scaled to megapixels={megapixels:g} it would be "
                             f"{scaled[0]}x{scaled[1]}, under {MIN_SCALED_SIDE} pixels on a side: "
                             "raise megapixels or crop the image")


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
