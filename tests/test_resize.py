"""The prepare stage scales image1 exactly as ComfyUI's ImageScaleToTotalPixels does, for every
upscale method: checked against the node's own outputs stored in tests/data/comfyui_resize.npz
(made by tests/make_comfyui_reference.py from a ComfyUI checkout; tests/test_comfyui_executor.py
checks against the live node when a checkout is given)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import StageParameters
from stages import resize
from stages.definitions import BY_NAME, JobInputs, fingerprint
from stages.prepare import prepare

REFERENCE = np.load(Path(__file__).parent / "data" / "comfyui_resize.npz")
METHODS = [str(m) for m in REFERENCE["methods"]]
SCALES = [float(s) for s in REFERENCE["scales"]]


def comfy_values(image: np.ndarray) -> np.ndarray:
    """A prepared image in ComfyUI's float scale (what the comfyui engine hands its nodes)."""
    return image.astype(np.float32) / np.float32(255.0) if image.dtype == np.uint8 else image


@pytest.mark.parametrize("megapixels", SCALES, ids=["up", "down"])
@pytest.mark.parametrize("method", METHODS)
def test_prepare_gives_the_node_s_values_for_every_method(method, megapixels, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(REFERENCE["source"]).save(source)
    expected = REFERENCE[f"out:{method}@{megapixels}"]
    prepared = prepare([("image1", source)], StageParameters(upscale_method=method, megapixels=megapixels),
                       10**8)["images"][0]
    assert prepared.shape == expected.shape
    assert np.array_equal(comfy_values(prepared), expected), (
        f"max difference {np.abs(comfy_values(prepared) - expected).max() * 255:.4f}/255")
    # 8 bits where the values are 8-bit levels (no information lost), ComfyUI's floats otherwise.
    assert prepared.dtype == (np.uint8 if method in ("lanczos", "nearest-exact") else np.float32)


def test_target_sizes_follow_the_node_s_arithmetic_for_every_size_and_megapixel_pair():
    grid, sizes = REFERENCE["grid"], REFERENCE["sizes"]
    ours = [resize.scaled_size(int(w), int(h), float(mp)) for w, h, mp in grid]
    assert len(ours) > 3000
    assert ours == [tuple(int(v) for v in size) for size in sizes]
    # 1080x1350 at 2.37 MP is one of the sizes where the pixel total must be a whole number first.
    assert resize.scaled_size(1080, 1350, 2.37) == (1410, 1762)


def test_images_2_and_3_are_not_scaled_and_stay_8_bit(tmp_path):
    paths = []
    for label, size in (("image1", (40, 30)), ("image2", (33, 21))):
        paths.append((label, tmp_path / f"{label}.png"))
        Image.fromarray(np.full((size[1], size[0], 3), 77, np.uint8)).save(paths[-1][1])
    images = prepare(paths, StageParameters(upscale_method="bicubic", megapixels=0.002), 10**8)["images"]
    assert images[1].dtype == np.uint8 and images[1].shape == (21, 33, 3)


def test_eight_bit_rounds_float_values_to_the_nearest_level():
    floats = np.array([[[0.0, 0.5 / 255, 1.49 / 255], [1.2, -0.1, 254.6 / 255]]], np.float32)
    assert resize.eight_bit(floats).tolist() == [[[0, 0, 1], [255, 0, 255]]]
    levels = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    assert resize.exact_8bit(levels.astype(np.float32) / np.float32(255.0)).dtype == np.uint8


def prepare_fingerprint(**params) -> str:
    job = JobInputs(prompt="p", negative_prompt="", seed=1, images=(("image1", "ab" * 32),))
    return fingerprint(BY_NAME["prepare"], job, StageParameters(**params), "engine", {}, {})


def test_the_prepare_fingerprint_changes_only_where_the_scaling_changed():
    # lanczos at a megapixel value whose pixel total is whole: the same pixels as before.
    assert "scaling" not in resize.fingerprint_values("lanczos", 1.0)
    assert "scaling" not in resize.fingerprint_values("lanczos", 0.25)
    # Other methods, and totals that ``int`` changes: other pixels, another fingerprint.
    for method in ("bicubic", "bilinear", "area", "nearest-exact"):
        assert resize.fingerprint_values(method, 1.0) == {"scaling": "comfyui"}
    assert resize.fingerprint_values("lanczos", 2.37) == {"scaling": "comfyui"}
    assert prepare_fingerprint(upscale_method="bicubic") != prepare_fingerprint(upscale_method="bilinear")
