"""Encoding a decoded picture into the published file: PNG (8 or 16 bits), JPEG or WebP, with
its metadata (EXIF, XMP, ICC profile; PNG text chunks), and resizing it to image1's size.

Pillow writes 8-bit RGB in every format and the metadata each allows (PNG: ``eXIf``, ``iCCP``,
``iTXt`` XMP, ``tEXt``). It cannot write 16-bit RGB PNGs, so those are written by pypng and
given the same chunks.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Optional

import numpy as np
from PIL import Image, PngImagePlugin

from processor.metadata import OutputMetadata

XMP_KEY = "XML:com.adobe.xmp"


def resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` ([H, W, 3], uint8 or uint16) resized to ``size`` (width, height) with Lanczos."""
    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    if pixels.dtype == np.uint8:
        return np.asarray(Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.LANCZOS))
    channels = [np.asarray(Image.fromarray(pixels[..., c].astype(np.float32), "F")
                           .resize(size, Image.Resampling.LANCZOS)) for c in range(3)]
    top = np.iinfo(pixels.dtype).max
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, top).astype(pixels.dtype)


def image_bytes(image: Any, output_format: str, quality: int, text: dict[str, str],
                metadata: Optional[OutputMetadata] = None) -> bytes:
    """Encode an [H, W, 3] uint8 image (uint16: 16-bit PNG); PNGs carry ``text`` as tEXt chunks."""
    pixels = np.asarray(image)
    metadata = metadata or OutputMetadata()
    if pixels.dtype == np.uint16:
        if output_format != "png":
            raise ValueError(f"16-bit pixels can only be published as PNG, not {output_format}")
        return _png16_bytes(pixels, text, metadata)
    if pixels.dtype != np.uint8:
        raise ValueError(f"the image to publish must be 8-bit or 16-bit, not {pixels.dtype}")
    picture = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    extra: dict[str, Any] = {}
    if metadata.exif:
        extra["exif"] = metadata.exif
    if metadata.icc:
        extra["icc_profile"] = metadata.icc
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        if metadata.xmp:
            info.add_itxt(XMP_KEY, metadata.xmp.decode("utf-8"), zip=False)
        picture.save(buffer, format="PNG", pnginfo=info, **extra)
    elif output_format == "jpg":
        picture.save(buffer, format="JPEG", quality=quality, xmp=metadata.xmp or b"", **extra)
    elif output_format == "webp":
        picture.save(buffer, format="WEBP", quality=quality, xmp=metadata.xmp or b"", **extra)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def _png16_bytes(pixels: np.ndarray, text: dict[str, str], metadata: OutputMetadata) -> bytes:
    import png  # pypng

    height, width = pixels.shape[:2]
    plain = io.BytesIO()
    png.Writer(width, height, greyscale=False, bitdepth=16).write(plain, pixels.reshape(height, width * 3))
    chunks = list(png.Reader(bytes=plain.getvalue()).chunks())
    extra: list[tuple[bytes, bytes]] = []
    if metadata.icc:
        extra.append((b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(metadata.icc)))
    if metadata.exif:
        extra.append((b"eXIf", metadata.exif.removeprefix(b"Exif\x00\x00")))
    if metadata.xmp:
        extra.append((b"iTXt", XMP_KEY.encode("latin-1") + b"\x00\x00\x00\x00\x00" + metadata.xmp))
    for key, value in text.items():
        try:
            extra.append((b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")))
        except UnicodeEncodeError:
            extra.append((b"iTXt", key.encode("latin-1", "replace") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")))
    out = io.BytesIO()
    png.write_chunks(out, chunks[:1] + extra + chunks[1:])  # right after IHDR
    return out.getvalue()
