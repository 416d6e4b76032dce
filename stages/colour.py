"""Colour and pixel-format management: every picture Pillow opens becomes upright 8-bit sRGB.

The model works in 8-bit sRGB. A photo arrives in whatever Pillow opens: 16-bit and 32-bit
grey (``I;16``, ``I``), floats (``F``), palettes, CMYK, LAB, with or without an ICC profile
(Display P3 and Adobe RGB are common). ``to_srgb`` makes the right 8-bit RGB picture of each
or refuses it with a reason (``PictureError``); it never lets Pillow clip a 16-bit picture to
white or a float one to black.

- Integer pictures are scaled by their bit depth (16-bit: value / 257, rounded).
- Float pictures: 0..1 is black..white (the float TIFF/PFM convention); a float picture whose
  values are whole numbers up to 255 is taken as 8-bit values stored as floats; values beyond
  1 are highlights and clip; NaN is black.
- An embedded ICC profile (RGB, grey or CMYK) is converted to sRGB with LittleCMS (Pillow's
  ImageCms), relative colorimetric with black-point compensation, the usual choice for photos;
  a profile that says it is sRGB is left alone, and a profile LittleCMS cannot read is
  ignored (the picture is taken as sRGB) with a note.
- ``from_srgb`` converts 8-bit sRGB back into a picture's own RGB profile, for outputs that
  are to keep the input's colour space.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

# Pillow refuses PNG chunks (text, ICC profiles) that decompress to more than 1 MiB; printer
# and camera profiles of several MB exist, so this allows up to 16 MiB and names that limit.
MAX_PNG_CHUNK = 16 * 1024 * 1024
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_CHUNK)

INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION
_PASS_THROUGH = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "HSV", "YCbCr"}


class PictureError(ValueError):
    """A picture that cannot become an 8-bit RGB picture; the message says why."""


@dataclass(frozen=True)
class Colour:
    """What ``to_srgb`` found and did."""

    profile: Optional[bytes]  # the usable embedded ICC profile, or None
    description: str  # the profile's name, "sRGB (assumed)" without one
    converted: bool  # whether the pixels were converted from ``profile`` to sRGB
    profile_mode: str  # colour space of the profile: "RGB", "L", "CMYK", "LAB" or "" (none)
    bits: int  # bits per channel of the source picture (8, 16, 32)
    note: str = ""  # e.g. an unreadable profile that was ignored


def source_bits(image: Image.Image) -> int:
    """Bits per channel the file holds (Pillow opens 16-bit RGB PNGs as 8-bit ``RGB``)."""
    if image.mode.startswith("I;16"):
        return 16
    if image.mode in ("I", "F"):
        tiff_bits = getattr(image, "tag_v2", {}).get(258)
        if tiff_bits:
            return int(tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits)
        return 16 if image.format == "PNG" else 32
    rawmode = image.tile[0][3] if image.tile else ""
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    if isinstance(rawmode, str) and ";16" in rawmode:
        return 16
    tiff_bits = getattr(image, "tag_v2", {}).get(258)
    if tiff_bits:
        first = tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits
        return int(first)
    return 8


def to_eight_bit(image: Image.Image, bits: int) -> Image.Image:
    """The picture in an 8-bit mode (``L``, ``RGB``, ``CMYK``, ...), values scaled by their depth."""
    mode = image.mode
    if mode in _PASS_THROUGH or mode in ("CMYK", "LAB"):
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and bits > 16:
            top = 2**31 - 1  # Pillow's "I" is signed 32-bit
        else:
            top = 65535 if bits > 8 else 255
        return Image.fromarray(_scaled(values / top), "L")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
        if values.size and values.max() > 1.0 and values.max() <= 255 and np.all(values == np.round(values)):
            values = values / 255.0
        return Image.fromarray(_scaled(values), "L")
    raise PictureError(f"pictures in Pillow mode {mode!r} are not supported")


def _scaled(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _profile(data: Optional[bytes]) -> tuple[Optional[ImageCms.ImageCmsProfile], str]:
    if not data:
        return None, ""
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(data)), ""
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        return None, f"the embedded ICC profile ({len(data)} bytes) is not readable and was ignored ({exc})"


def profile_description(profile: ImageCms.ImageCmsProfile) -> str:
    try:
        return (ImageCms.getProfileDescription(profile) or "").strip() or "unnamed profile"
    except ImageCms.PyCMSError:
        return "unnamed profile"


def _colour_space(profile: ImageCms.ImageCmsProfile) -> str:
    space = (profile.profile.xcolor_space or "").strip().upper()
    return {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK", "LAB": "LAB"}.get(space, space)


def is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    return profile_description(profile).lower().startswith("srgb")


SRGB = ImageCms.createProfile("sRGB")
# LittleCMS stamps a profile it makes with the time; a fixed date keeps outputs byte-identical.
_made = ImageCms.ImageCmsProfile(SRGB).tobytes()
SRGB_BYTES = _made[:24] + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + _made[36:]


def to_srgb(image: Image.Image, bits: Optional[int] = None) -> tuple[Image.Image, Colour]:
    """An opened picture as upright 8-bit sRGB ``RGB``, and what was done to its colour.
    ``bits``: ``source_bits`` of the picture, taken before it was loaded (loading forgets it)."""
    icc = image.info.get("icc_profile")
    bits = source_bits(image) if bits is None else bits
    image = ImageOps.exif_transpose(image)
    image = to_eight_bit(image, bits)
    profile, note = _profile(icc)
    if profile is None:
        if image.mode == "LAB":
            image = ImageCms.applyTransform(image, ImageCms.buildTransform(
                ImageCms.createProfile("LAB"), SRGB, "LAB", "RGB", INTENT, FLAGS))
        return image.convert("RGB"), Colour(None, "sRGB (assumed)", False, "", bits, note)
    description = profile_description(profile)
    space = _colour_space(profile)
    if space == "RGB" and is_srgb(profile):
        return image.convert("RGB"), Colour(icc, description, False, space, bits)
    in_mode = {"RGB": "RGB", "L": "L", "CMYK": "CMYK", "LAB": "LAB"}.get(space)
    if in_mode is None:
        return image.convert("RGB"), Colour(None, "sRGB (assumed)", False, "", bits,
                                            f"the embedded ICC profile is for {space or 'an unknown'} colour, "
                                            "which does not match the picture; it was ignored")
    source = image if image.mode == in_mode else image.convert(in_mode)
    try:
        transform = ImageCms.buildTransform(profile, SRGB, in_mode, "RGB", INTENT, FLAGS)
        converted = ImageCms.applyTransform(source, transform)
    except ImageCms.PyCMSError as exc:
        return image.convert("RGB"), Colour(None, "sRGB (assumed)", False, "", bits,
                                            f"the embedded ICC profile '{description}' could not be applied "
                                            f"and was ignored ({exc})")
    return converted, Colour(icc, description, True, space, bits)


def rgb_profile_name(icc: bytes) -> Optional[str]:
    """The name of an RGB profile other than sRGB (Display P3, Adobe RGB...); None for sRGB,
    grey, CMYK or unreadable profiles."""
    profile, _ = _profile(icc)
    if profile is None or _colour_space(profile) != "RGB" or is_srgb(profile):
        return None
    return profile_description(profile)


def from_srgb(image: Image.Image, profile_bytes: bytes) -> Image.Image:
    """8-bit sRGB ``RGB`` converted into the RGB ICC profile ``profile_bytes``."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
    transform = ImageCms.buildTransform(SRGB, profile, "RGB", "RGB", INTENT, FLAGS)
    return ImageCms.applyTransform(image, transform)
