"""What a published picture holds: the decoded pixels at the size, bit depth and colour the job
asks for, with image1's metadata and the edit's provenance.

Decisions, in order:

1. **Bit depth**: 16 when the job asks for it (``bit_depth`` 16, or ``input`` and image1 has
   more than 8 bits per channel), the format is PNG and the engine handed over 16-bit pixels
   (``image16`` of the decode payload); else 8.
2. **Size**: ``output_size = "input"`` resizes (Lanczos) to image1's upright size; ``model``
   keeps the size the model worked at. A resize at publish leaves every checkpoint as it is.
3. **Colour**: the pixels are sRGB. ``colour_profile = "input"`` converts 8-bit pixels back into
   image1's own RGB profile and embeds it; otherwise (and for 16-bit, CMYK or grey inputs) the
   output is tagged sRGB.
4. **Metadata**: ``processor/metadata.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from config import JobSpec, StageParameters
from processor.encode import image_bytes, resized
from processor.metadata import Provenance, SourcePicture, output_metadata, read_source
from stages.colour import SRGB_BYTES, from_srgb, rgb_profile_name

SOFTWARE = "qie-hotfolder (Qwen-Image-Edit-2509)"


@dataclass(frozen=True)
class Output:
    data: bytes
    info: dict[str, Any]  # the manifest's "output" entries


def source_of(work_dir: Path, spec: JobSpec) -> Optional[SourcePicture]:
    """image1's metadata from the job's ingested original (None when it cannot be read)."""
    stored = spec.images.get("image1")
    if not stored:
        return None
    try:
        return read_source(work_dir / "originals" / stored)
    except (OSError, ValueError, SyntaxError):
        return None


def make_output(spec: JobSpec, params: StageParameters, final: dict[str, Any], source: Optional[SourcePicture],
                manifest_name: str, engine_text: dict[str, str]) -> Output:
    """The published file's bytes for a decode payload ``final``; ``engine_text`` is the engine's
    own text for it (PNG text chunks, e.g. ComfyUI's prompt and workflow)."""
    pixels8 = np.asarray(final["image"])
    pixels16 = final.get("image16")
    # 1. Bit depth
    wants16 = params.bit_depth == 16 or (params.bit_depth == "input" and source is not None and source.bits > 8)
    pixels = np.asarray(pixels16) if wants16 and params.output_format == "png" and pixels16 is not None else pixels8
    model_size = (int(pixels.shape[1]), int(pixels.shape[0]))
    # 2. Size
    if params.output_size == "input" and source is not None:
        pixels = resized(pixels, source.size)
    size = (int(pixels.shape[1]), int(pixels.shape[0]))
    # 3. Colour
    icc, colour = SRGB_BYTES, "sRGB"
    if spec.output.colour_profile == "input" and source is not None and source.icc:
        target = rgb_profile_name(source.icc)
        if target is not None and pixels.dtype == np.uint8:
            pixels = np.asarray(from_srgb(Image.fromarray(pixels, "RGB"), source.icc))
            icc, colour = source.icc, target
    # 4. Metadata
    provenance = Provenance(software=SOFTWARE, prompt=spec.prompt, seed=spec.seed, manifest=manifest_name)
    options = spec.output
    metadata = output_metadata(source or SourcePicture(None, None, None, size, 8), size, icc, provenance,
                               options.strip_location, options.strip_metadata)
    text = {"parameters": _parameters_text(spec, params), "software": "qie-hotfolder", **engine_text}
    data = image_bytes(pixels, params.output_format, params.quality, text, metadata)
    has_gps = source is not None and source.exif is not None and bool(source.exif.get_ifd(0x8825))
    info = {"width": size[0], "height": size[1], "format": params.output_format,
            "size": params.output_size, "model_size": list(model_size),
            "bit_depth": 16 if pixels.dtype == np.uint16 else 8, "colour_profile": colour,
            "metadata": {"from_image1": ", ".join(kind for kind, found in (("exif", source and source.exif),
                                                                           ("xmp", source and source.xmp))
                                                  if found and not options.strip_metadata) or "none",
                         "location": ("stripped" if (options.strip_location or options.strip_metadata) and has_gps
                                      else "kept" if has_gps else "none")}}
    return Output(data, info)


def _parameters_text(spec: JobSpec, params: StageParameters) -> str:
    return json.dumps({"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed,
                       **params.model_dump(mode="json")}, sort_keys=True)
