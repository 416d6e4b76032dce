"""The comfyui engine publishes the PNG ComfyUI itself saves: checked against ComfyUI's own executor.

For each case the real daemon (``run.py serve``, comfyui engine, tiny models) publishes a job;
the ``prompt`` text chunk of its PNG (the job's graph in ComfyUI's API format) is checked to be
the template's graph with the job's values, then run through ``execution.PromptExecutor`` (the
machinery behind ComfyUI's queue, in this process) on the same image files; the PNG that
ComfyUI's SaveImage writes must hold the same pixels. The ``workflow`` chunk must describe the
same graph in the editor's format. Also: prepare's scaling against the live
ImageScaleToTotalPixels for every method, and the node declarations the workflow is built from.

Runs only with ``QIE_COMFYUI_PATH`` (see tests/test_comfyui_engine.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

COMFYUI = os.environ.get("QIE_COMFYUI_PATH")
if not COMFYUI or not (Path(COMFYUI) / "nodes.py").is_file():
    pytest.skip("ComfyUI executor test: set QIE_COMFYUI_PATH to a ComfyUI checkout (and run with a Python that "
                "has ComfyUI's requirements) to run it", allow_module_level=True)

import torch  # noqa: E402

from config import StageParameters  # noqa: E402
from stages import comfyui_graph  # noqa: E402
from stages.comfyui_nodes import to_comfy_image  # noqa: E402
from stages.prepare import prepare  # noqa: E402
from tests import comfyui_executor  # noqa: E402
from tests.daemon import Folders, make_image, tiny_job  # noqa: E402
from tests.test_comfyui_engine import NAMES, engine, models, serve  # noqa: E402,F401 - fixtures

MODELS = comfyui_graph.GraphModels(NAMES["vae"], NAMES["text_encoder"], NAMES["diffusion_model"], "default")
MEGAPIXELS = 0.01  # ImageScaleToTotalPixels' smallest value (ComfyUI refuses a graph below it)

CASES = {
    "default": ({}, {"photo.png": (64, 64)}),
    "cfg-2.5-negative": ({"cfg": 2.5, "negative_prompt": "blurry, low quality"}, {"photo.png": (64, 64)}),
    "two-references": ({"image2": "ref-a.png", "image3": "ref-b.png"},
                       {"photo.png": (64, 64), "ref-a.png": (40, 56), "ref-b.png": (72, 48)}),
    "seed-2^64-1": ({"seed": 2**64 - 1}, {"photo.png": (64, 64)}),
}


def publish(tmp_path: Path, models: Path, name: str, job: dict, images: dict, **env: str) -> Folders:
    folders = Folders(tmp_path / name, tmp_path / "no-diffusers-model")
    folders.drop("edit", job, images=images)
    result = serve(folders, models, "--once", **env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (folders.outbox / "edit.png").is_file(), result.stderr[-4000:]
    return folders


def comfyui_saves(folders: Folders, images: dict, graph: dict) -> np.ndarray:
    """The pixels ComfyUI's executor saves for ``graph`` on the job's image files."""
    sources = {}
    for name, size in images.items():
        sources[name] = make_image(folders.root / "comfyui-images" / name, size)  # the same files as dropped
    return comfyui_executor.pixels(comfyui_executor.execute(graph, sources, folders.root / "comfyui"))


def differences_from_comfyui(folders: Folders, job: dict, images: dict) -> str:
    """Checks the PNG's graph chunks, then compares its pixels with what ComfyUI's executor saves
    for that graph: "" when identical, else how they differ."""
    png = folders.outbox / "edit.png"
    chunks = comfyui_executor.text_chunks(png)
    graph = json.loads(chunks["prompt"])
    manifest = json.loads((folders.outbox / "edit.json").read_text())
    # The chunk is the template's graph with this job's values; the manifest holds the same.
    params = StageParameters(**manifest["parameters"])
    names = [job[key] for key in ("image1", "image2", "image3") if key in job]
    assert graph == comfyui_graph.api_graph(MODELS, job["prompt"], job.get("negative_prompt", ""), manifest["seed"],
                                            names, params)
    assert manifest["engine_metadata"]["prompt"] == graph
    assert manifest["engine_metadata"]["workflow"] == json.loads(chunks["workflow"])
    assert workflow_as_api(json.loads(chunks["workflow"])) == without_meta(graph)

    ours = comfyui_executor.pixels(png)
    theirs = comfyui_saves(folders, images, graph)
    if ours.shape != theirs.shape:
        return f"shapes {ours.shape} and {theirs.shape}"
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    return f"{(difference > 0).mean():.1%} of values differ, by up to {difference.max()}" if difference.any() else ""


@pytest.mark.parametrize("case", list(CASES))
def test_the_published_png_has_the_pixels_comfyui_saves_for_the_job_graph(case, models, tmp_path):
    overrides, images = CASES[case]
    job = tiny_job(**{"seed": 21, "megapixels": MEGAPIXELS, **overrides})
    folders = publish(tmp_path, models, case, job, images)
    assert differences_from_comfyui(folders, job, images) == ""


def test_a_job_killed_mid_sampling_and_resumed_still_has_comfyui_s_pixels(models, tmp_path):
    job = tiny_job(seed=9, megapixels=MEGAPIXELS, steps=6)
    images = {"photo.png": (64, 64)}
    folders = Folders(tmp_path / "killed", tmp_path / "no-diffusers-model")
    folders.drop("edit", job, images=images)
    # SIGKILL right after step 4; step 3's partial is durable by then (the pause lets the writer store it).
    killed = serve(folders, models, "--once", QIE_FAULTS="stage.sample.step3=pause:1,stage.sample.step4")
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert not (folders.outbox / "edit.png").exists()
    result = serve(folders, models, "--once")
    assert result.returncode == 0, result.stderr[-4000:]
    runs = folders.db_rows("SELECT resumed_from_step FROM stage_runs WHERE stage = 'sample' AND error IS NULL")
    assert runs[-1] in ((3,), (4,))
    assert differences_from_comfyui(folders, job, images) == ""


def test_cfg_1_skips_the_negative_encoding_and_the_sampler_gives_the_same_latent(engine):
    """At cfg 1 the negative is not encoded; sampling with the stand-in gives the bits KSampler
    gives with the encoded negative (and a different negative prompt changes nothing)."""
    prepared = {"images": [torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(3))]}
    params = StageParameters(lora=NAMES["lora"])
    text = engine.encode_text(prepared, params, "make it blue", "ugly")
    assert text["negative"] is None
    latent = engine.encode_latent(prepared, params)
    ours = engine.sample(prepared, latent, text, params, 4, None, None)["samples"]
    full = engine.encode_text(prepared, params.model_copy(update={"cfg": 2.0}), "make it blue", "ugly")
    with torch.inference_mode():
        theirs = engine.comfy.node("KSampler", model=engine._transformer(params), seed=4, steps=params.steps,
                                   cfg=1.0, sampler_name=params.sampler, scheduler=params.scheduler,
                                   positive=text["positive"], negative=full["negative"], latent_image=latent,
                                   denoise=params.denoise)
    assert torch.equal(ours, theirs["samples"])


# Scaling and node declarations against the live checkout ------------------------------------------

@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_prepare_equals_image_scale_to_total_pixels(engine, method, tmp_path):
    source = make_image(tmp_path / "source.png", (97, 61))
    for megapixels in (0.013, 0.002):
        ours = prepare([("image1", source)], StageParameters(upscale_method=method, megapixels=megapixels),
                       10**8)["images"][0]
        with torch.inference_mode():
            loaded = engine.comfy.node("LoadImage", image=str(source))
            theirs = engine.comfy.node("ImageScaleToTotalPixels", image=loaded, upscale_method=method,
                                       megapixels=megapixels)
        assert torch.equal(to_comfy_image(ours), theirs), f"{method} at {megapixels} MP"


def test_target_sizes_are_the_node_s_for_a_grid_of_sizes(engine, monkeypatch):
    import comfy.utils

    from stages.resize import scaled_size
    from tests.make_comfyui_reference import size_grid

    asked = []
    monkeypatch.setattr(comfy.utils, "common_upscale",
                        lambda samples, width, height, method, crop: asked.append((width, height)) or samples)
    grid = size_grid()
    for width, height, megapixels in grid:
        engine.comfy.node("ImageScaleToTotalPixels", image=torch.zeros(1, int(height), int(width), 1),
                          upscale_method="nearest-exact", megapixels=float(megapixels))
    assert [scaled_size(int(w), int(h), float(mp)) for w, h, mp in grid] == asked


def test_the_workflow_s_node_declarations_are_the_checkout_s(engine):
    for kind, (inputs, outputs) in comfyui_graph.NODE_TYPES.items():
        declared = declared_inputs(engine.comfy.nodes.NODE_CLASS_MAPPINGS[kind])
        assert [(name, kind_) for name, kind_, _ in declared] == list(inputs), kind
        assert tuple(engine.comfy.nodes.NODE_CLASS_MAPPINGS[kind].RETURN_TYPES) == outputs, kind


# The editor's format read back with the checkout's declarations (not the module's table) -----------

def declared_inputs(cls) -> list[tuple[str, str, dict]]:
    found = []
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            found.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return found


def workflow_as_api(workflow: dict) -> dict:
    """What the editor queues for a loaded workflow: widget values by input name, links as [id, slot]."""
    import nodes

    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        values = iter(node["widgets_values"])
        inputs = {}
        for name, kind, options in declared_inputs(nodes.NODE_CLASS_MAPPINGS[node["type"]]):
            if kind in comfyui_graph.WIDGET_TYPES:
                inputs[name] = next(values)
                if options.get("control_after_generate") or options.get("image_upload"):
                    next(values)
        for socket in node["inputs"]:
            if socket["link"] is not None:
                _, source, slot, target, _, _ = links[socket["link"]]
                assert target == node["id"]
                inputs[socket["name"]] = [str(source), slot]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def without_meta(graph: dict) -> dict:
    return {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in graph.items()}
