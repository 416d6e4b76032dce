"""Write tests/data/comfyui_resize.npz: what ComfyUI's ImageScaleToTotalPixels gives, so that
tests/test_resize.py checks ``stages/resize.py`` against ComfyUI without a ComfyUI checkout.

Run it with a Python that can import ComfyUI (its requirements installed)::

    QIE_COMFYUI_PATH=/path/to/ComfyUI python tests/make_comfyui_reference.py

It stores, computed by the node itself: for a fixed random source image, the node's output for
every upscale method at two sizes (up and down); and for a grid of image sizes and megapixel
values, the size the node scales to (its arithmetic, read off the arguments it hands
``comfy.utils.common_upscale``). The checkout's commit and the library versions go in too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "comfyui_resize.npz"
METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
SOURCE_SIZE = (29, 19)  # width, height
SCALES = (0.0008, 0.0002)  # megapixels: up and down from 29x19
# Common photo and screen sizes, both orientations, and megapixel values a job may give.
SIDES = ((640, 480), (800, 600), (1024, 768), (1080, 1350), (1080, 1920), (1200, 1600), (1280, 720),
         (1366, 768), (1500, 1000), (1920, 1080), (2048, 1536), (2560, 1440), (3000, 2000), (3024, 4032),
         (3840, 2160), (4000, 3000), (4032, 3024), (5472, 3648), (6000, 4000), (333, 517))
MEGAPIXELS = tuple(round(0.01 * k, 2) for k in range(1, 81)) + (1.5, 2.37, 3.3, 4.0, 0.33, 0.77)


def source_image() -> np.ndarray:
    return np.random.default_rng(20261202).integers(0, 256, (SOURCE_SIZE[1], SOURCE_SIZE[0], 3), dtype=np.uint8)


def size_grid() -> np.ndarray:
    """Rows (width, height, megapixels)."""
    rows = []
    for width, height in SIDES:
        for w, h in ((width, height), (height, width)):
            for mp in MEGAPIXELS:
                rows.append((w, h, mp))
    return np.array(rows, dtype=np.float64)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from config import Settings
    from stages.comfyui_engine import boot

    comfy = boot(Settings(engine="comfyui", comfyui_path=Path(os.environ["QIE_COMFYUI_PATH"]), device="cpu"))
    import comfy.utils as comfy_utils
    import PIL
    import torch

    node = comfy.nodes.NODE_CLASS_MAPPINGS["ImageScaleToTotalPixels"]
    image = torch.from_numpy(source_image().astype(np.float32) / 255.0)[None]  # LoadImage's values
    outputs = {}
    for method in METHODS:
        for mp in SCALES:
            outputs[f"{method}@{mp}"] = node.execute(image=image, upscale_method=method, megapixels=mp)[0][0].numpy()

    sizes = []
    real = comfy_utils.common_upscale
    try:
        comfy_utils.common_upscale = lambda samples, width, height, method, crop: (sizes.append((width, height))
                                                                                    or samples)
        for width, height, mp in size_grid():
            node.execute(image=torch.zeros(1, int(height), int(width), 1), upscale_method="nearest-exact",
                         megapixels=float(mp))
    finally:
        comfy_utils.common_upscale = real
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, source=source_image(), scales=np.array(SCALES), methods=np.array(METHODS),
                        grid=size_grid(), sizes=np.array(sizes, dtype=np.int64),
                        made_with=np.array(f"ComfyUI {comfy.version} ({comfy.commit}); torch {torch.__version__}; "
                                           f"Pillow {PIL.__version__}"),
                        **{f"out:{key}": value for key, value in outputs.items()})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with {comfy.describe()}")


if __name__ == "__main__":
    main()
