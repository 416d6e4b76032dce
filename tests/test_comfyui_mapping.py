"""The ComfyUI engine's pure part, without ComfyUI: job parameters -> node calls, boot options,
cache keys, and ComfyUI's LATENT / CONDITIONING / IMAGE values through checkpoints (also read back
in another process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from processor.store import read_checkpoint, write_checkpoint
import torch

from config import Settings, StageParameters
from config.job import REFERENCE_LORA
from stages import checkpoint as ckpt
from stages import comfyui_nodes as m
from stages.comfyui_nodes import MappingError, NodeCall, Ref

ROOT = Path(__file__).resolve().parent.parent


def params(**kw) -> StageParameters:
    return StageParameters(**kw)


# Nodes and their arguments --------------------------------------------------------------------------

def test_loaders_get_the_settings_model_files_and_the_reference_options():
    settings = Settings()
    assert m.vae_loader(settings.vae_name) == NodeCall("VAELoader", {"vae_name": "qwen_image_vae.safetensors"})
    assert m.clip_loader(settings.text_encoder_name) == NodeCall(
        "CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"})
    assert m.unet_loader(settings.diffusion_model_name, "fp8_e4m3fn") == NodeCall(
        "UNETLoader", {"unet_name": "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "weight_dtype": "fp8_e4m3fn"})


def test_the_model_is_patched_with_lora_then_aura_flow_shift_then_cfg_norm():
    calls = m.model_patches(params())
    assert calls == [
        NodeCall("LoraLoaderModelOnly", {"model": Ref("model"), "lora_name": REFERENCE_LORA, "strength_model": 1.0}),
        NodeCall("ModelSamplingAuraFlow", {"model": Ref("model"), "shift": 3.0}),
        NodeCall("CFGNorm", {"model": Ref("model"), "strength": 1.0}),
    ]
    custom = m.model_patches(params(lora="other.safetensors", lora_strength=0.5, shift=2.5, cfg_norm_strength=0.7))
    assert custom[0].kwargs["lora_name"] == "other.safetensors" and custom[0].kwargs["strength_model"] == 0.5
    assert custom[1].kwargs["shift"] == 2.5 and custom[2].kwargs["strength"] == 0.7


def test_without_a_lora_the_lora_node_is_left_out():
    assert [c.node for c in m.model_patches(params(lora=None))] == ["ModelSamplingAuraFlow", "CFGNorm"]


def test_the_starting_latent_is_vae_encode_of_image1_or_an_empty_latent_of_the_custom_size():
    assert m.latent_source(params()) == NodeCall("VAEEncode", {"pixels": Ref("image1"), "vae": Ref("vae")})
    assert m.latent_source(params(width=512, height=768)) == NodeCall(
        "EmptySD3LatentImage", {"width": 512, "height": 768, "batch_size": 1})
    with pytest.raises(MappingError, match="together"):
        m.latent_source(params(width=512))


def test_scaled_references_go_through_text_encode_with_the_vae():
    calls = m.text_encode_calls("scaled", "make it blue", 3)
    assert calls == [NodeCall("TextEncodeQwenImageEditPlus", {
        "clip": Ref("clip"), "prompt": "make it blue", "vae": Ref("vae"),
        "image1": Ref("image1"), "image2": Ref("image2"), "image3": Ref("image3")})]
    assert "image2" not in m.text_encode_calls("scaled", "", 1)[0].kwargs


def test_raw_latent_references_are_attached_with_one_reference_latent_each():
    calls = m.text_encode_calls("raw_latent", "p", 2)
    assert calls[0] == NodeCall("TextEncodeQwenImageEditPlus", {"clip": Ref("clip"), "prompt": "p",
                                                                 "image1": Ref("image1"), "image2": Ref("image2")})
    assert "vae" not in calls[0].kwargs
    assert calls[1:] == [NodeCall("ReferenceLatent", {"conditioning": Ref("conditioning"), "latent": Ref("latent1")}),
                         NodeCall("ReferenceLatent", {"conditioning": Ref("conditioning"), "latent": Ref("latent2")})]


def test_text_encode_refuses_a_bad_image_count_or_mode():
    with pytest.raises(MappingError):
        m.text_encode_calls("scaled", "p", 0)
    with pytest.raises(MappingError):
        m.text_encode_calls("scaled", "p", 4)
    with pytest.raises(MappingError, match="reference_mode"):
        m.text_encode_calls("sideways", "p", 1)


def test_ksampler_arguments_are_the_job_values():
    assert m.ksampler_arguments(params(), 42) == {"seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0}
    custom = m.ksampler_arguments(params(steps=20, cfg=2.5, sampler="heun", scheduler="beta", denoise=0.6), 1)
    assert custom == {"seed": 1, "steps": 20, "cfg": 2.5, "sampler_name": "heun", "scheduler": "beta", "denoise": 0.6}


def test_unknown_sampler_or_scheduler_names_are_refused_not_replaced():
    m.check_sampler("euler", "simple", ["euler"], ["simple"])
    with pytest.raises(MappingError, match="sampler 'eulr'"):
        m.check_sampler("eulr", "simple", ["euler"], ["simple"])
    with pytest.raises(MappingError, match="scheduler 'smple'"):
        m.check_sampler("euler", "smple", ["euler"], ["simple"])


# Boot options ----------------------------------------------------------------------------------------

def test_boot_arguments_follow_device_vram_mode_reserve_and_dtype():
    cpu = m.boot_arguments("cpu", "auto", None, "auto", cuda_available=True)
    assert cpu["cpu"] is True and not any(cpu[k] for k in ("lowvram", "normalvram", "highvram", "novram"))
    assert cpu["deterministic"] is True and "reserve_vram" not in cpu
    assert m.boot_arguments("auto", "auto", None, "auto", cuda_available=False)["cpu"] is True
    gpu = m.boot_arguments("cuda:1", "lowvram", 2.5, "bfloat16", cuda_available=True)
    assert gpu["cpu"] is False and gpu["lowvram"] is True and not gpu["highvram"]
    assert gpu["reserve_vram"] == 2.5 and gpu["bf16_unet"] and gpu["bf16_vae"] and gpu["bf16_text_enc"]
    assert m.boot_arguments("cuda", "highvram", None, "float32", True)["force_fp32"] is True
    assert m.boot_arguments("cuda", "novram", None, "float16", True)["fp16_unet"] is True
    with pytest.raises(MappingError, match="CUDA is not available"):
        m.boot_arguments("cuda", "auto", None, "auto", cuda_available=False)
    assert m.cuda_index("cuda:1") == 1 and m.cuda_index("cuda") is None and m.cuda_index("cpu") is None


def test_version_comparison():
    assert m.version_tuple("0.3.64") > m.version_tuple(m.MINIMUM_VERSION)
    assert m.version_tuple("v0.3.9") < m.version_tuple("0.3.60")
    assert m.version_tuple("0.4.0rc1") == (0, 4, 0)


# Identities and cache keys ------------------------------------------------------------------------------

def test_the_transformer_identity_and_cache_key_hold_everything_that_shapes_the_patched_model():
    a = m.transformer_identity("model bytes=1", "default", "lora.safetensors bytes=2", 1.0)
    assert a != m.transformer_identity("model bytes=1", "default", "lora.safetensors bytes=2", 0.5)
    assert a != m.transformer_identity("model bytes=1", "fp8_e4m3fn", "lora.safetensors bytes=2", 1.0)
    assert "lora none" in m.transformer_identity("model bytes=1", "default", None, 1.0)
    base = m.cache_key("transformer", a, params())
    assert base != m.cache_key("transformer", a, params(shift=2.0))
    assert base != m.cache_key("transformer", a, params(cfg_norm_strength=0.5))
    assert base == m.cache_key("transformer", a, params(steps=20, cfg=4.0))  # sampling only: same model
    assert m.cache_key("vae", "v") == ("comfyui", "vae", "v")


# Values across stage boundaries ------------------------------------------------------------------------

def test_prepared_images_become_comfy_images_like_load_image():
    image = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    comfy = m.to_comfy_image(image)
    assert comfy.shape == (1, 5, 7, 3) and comfy.dtype == torch.float32
    expected = torch.from_numpy(image.numpy().astype("float32") / 255.0)  # LoadImage's arithmetic
    assert torch.equal(comfy[0], expected)
    assert torch.equal(m.from_comfy_image(comfy), comfy[0])
    scaled = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(1))  # a float method's values
    assert torch.equal(m.to_comfy_image(scaled.numpy())[0], scaled)
    with pytest.raises(MappingError):
        m.to_comfy_image(image.double())
    with pytest.raises(MappingError):
        m.from_comfy_image(torch.zeros(2, 5, 7, 3))


def test_decoded_images_keep_16_bits_beside_save_images_8():
    image = torch.tensor([[[[0.0, 0.5, 1.0], [0.2, 0.70001, 1.2]]]])  # [1, 1, 2, 3], one value out of range
    eight, sixteen = m.saved_pixels(image), m.saved_pixels16(image)
    assert eight.dtype.name == "uint8" and sixteen.dtype.name == "uint16" and sixteen.shape == (1, 2, 3)
    assert sixteen.tolist() == [[[0, 32768, 65535], [13107, 45875, 65535]]]
    assert eight.tolist() == [[[0, 127, 255], [51, 178, 255]]]  # SaveImage truncates


def comfy_values(seed: int = 0) -> dict:
    """Payloads shaped like ComfyUI's: a LATENT, CONDITIONINGs with and without attention mask."""
    g = torch.Generator().manual_seed(seed)
    latent = {"samples": torch.randn(1, 16, 1, 8, 12, generator=g)}
    positive = [[torch.randn(1, 202, 3584, generator=g, dtype=torch.float32).to(torch.bfloat16),
                 {"pooled_output": None,
                  "reference_latents": [torch.randn(1, 16, 1, 104, 160, generator=g),
                                        torch.randn(1, 16, 1, 64, 64, generator=g)]}]]
    negative = [[torch.randn(1, 90, 3584, generator=g),
                 {"pooled_output": None, "attention_mask": torch.tensor([[1] * 80 + [0] * 10]),
                  "reference_latents": [torch.randn(1, 16, 1, 104, 160, generator=g)],
                  "reference_latents_method": "offset"}]]
    image = torch.rand(1, 64, 96, 3, generator=g)
    return {"latent": latent, "text": {"positive": positive, "negative": negative},
            "partial": {"x": torch.randn(1, 16, 1, 8, 12, generator=g), "steps_total": 4},
            "empty": {"samples": torch.zeros(1, 16, 8, 12)}, "image": image}


def assert_exactly_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b)  # checkpoints store dict keys sorted; ComfyUI looks keys up by name
        for key in a:
            assert_exactly_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_exactly_equal(x, y)
    else:
        assert a == b


def test_comfy_values_are_valid_payloads():
    values = comfy_values()
    m.check_latent(values["latent"])
    m.check_latent(values["empty"])
    m.check_conditioning(values["text"]["positive"])
    m.check_conditioning(values["text"]["negative"])
    with pytest.raises(MappingError, match="cannot be checkpointed"):
        m.check_conditioning([[torch.zeros(1), {"hooks": object()}]])
    with pytest.raises(MappingError):
        m.check_conditioning([(torch.zeros(1),)])
    with pytest.raises(MappingError):
        m.check_latent({"samples": torch.zeros(3)})


@pytest.mark.parametrize("name", ["latent", "text", "partial", "empty", "image"])
def test_comfy_values_round_trip_exactly_through_a_checkpoint(name, tmp_path):
    value = comfy_values()[name]
    sha = write_checkpoint(tmp_path / "c.safetensors", value)[0]
    assert_exactly_equal(read_checkpoint(tmp_path / "c.safetensors", sha), value)


def test_conditioning_keeps_none_and_list_structure_in_the_skeleton():
    tensors, skeleton, _ = ckpt.flatten(comfy_values()["text"])
    text = json.dumps(skeleton)
    assert '"pooled_output": null' in text
    assert len(tensors) == 6  # 2 embeddings, 1 attention mask, 3 reference latents
    rebuilt = ckpt.unflatten(tensors, skeleton)
    assert rebuilt["positive"][0][1]["pooled_output"] is None
    assert isinstance(rebuilt["positive"], list) and isinstance(rebuilt["positive"][0], list)


READ_BACK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from processor.store import read_checkpoint
from test_comfyui_mapping import comfy_values, assert_exactly_equal
from pathlib import Path
for name, sha in zip(sys.argv[4::2], sys.argv[5::2]):
    assert_exactly_equal(read_checkpoint(Path(sys.argv[3]) / (name + ".safetensors"), sha), comfy_values()[name])
print("same")
"""


def test_comfy_values_are_rebuilt_exactly_in_another_process(tmp_path):
    shas = []
    for name, value in comfy_values().items():
        shas += [name, write_checkpoint(tmp_path / f"{name}.safetensors", value)[0]]
    result = subprocess.run([sys.executable, "-c", READ_BACK, str(ROOT), str(ROOT / "tests"), str(tmp_path), *shas],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "same"


# The negative prompt at cfg 1 -----------------------------------------------------------------------

def test_the_negative_is_unused_exactly_where_comfyui_s_sampler_skips_it():
    assert m.negative_unused(1.0) and m.negative_unused(1.0 + 1e-12)
    assert not m.negative_unused(2.5) and not m.negative_unused(0.5)
    positive, negative = [[torch.zeros(1, 2, 3), {}]], [[torch.ones(1, 2, 3), {}]]
    assert m.sampler_negative({"positive": positive, "negative": None}, 1.0) is positive
    assert m.sampler_negative({"positive": positive, "negative": negative}, 1.0) is negative
    with pytest.raises(MappingError, match="needs the negative"):
        m.sampler_negative({"positive": positive, "negative": None}, 2.5)


def test_encode_text_fingerprints_keep_cfg_1_and_cfg_above_1_and_part_where_the_engines_differ():
    from stages.definitions import BY_NAME

    from stages.definitions import JobInputs

    values = BY_NAME["encode_text"].job_values
    job = JobInputs(prompt="p", negative_prompt="n", seed=1, images=())
    assert values(job, params(cfg=1.0)) == {"prompt": "p", "negative_prompt": "n", "true_cfg": False}
    assert values(job, params(cfg=2.5)) == {"prompt": "p", "negative_prompt": "n", "true_cfg": True}
    # ComfyUI reads the negative at cfg 0.5 (diffusers does not); ComfyUI skips it just above 1.
    assert values(job, params(cfg=0.5))["cfg_near_1"] is False
    assert values(job, params(cfg=1.0 + 1e-12))["cfg_near_1"] is True


# The job as a ComfyUI graph (the PNG's prompt and workflow chunks) ----------------------------------

def test_the_job_graph_is_the_template_with_the_job_s_values():
    from stages.comfyui_graph import GraphModels, api_graph

    models = GraphModels("vae.safetensors", "te.safetensors", "dit.safetensors", "fp8_e4m3fn")
    graph = api_graph(models, "make it snow", "", 2**64 - 1, ["photo.png", "ref.png"], params())
    by_type = {}
    for node in graph.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert sorted(by_type) == sorted(["UNETLoader", "LoraLoaderModelOnly", "ModelSamplingAuraFlow", "CFGNorm",
                                      "CLIPLoader", "VAELoader", "LoadImage", "ImageScaleToTotalPixels", "VAEEncode",
                                      "TextEncodeQwenImageEditPlus", "KSampler", "VAEDecode", "SaveImage"])
    assert [i["image"] for i in by_type["LoadImage"]] == ["photo.png", "ref.png"]
    assert by_type["ImageScaleToTotalPixels"][0]["upscale_method"] == "lanczos"
    assert by_type["UNETLoader"][0] == {"unet_name": "dit.safetensors", "weight_dtype": "fp8_e4m3fn"}
    sampler = by_type["KSampler"][0]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        2**64 - 1, 4, 1.0, "euler", "simple")
    positive, negative = by_type["TextEncodeQwenImageEditPlus"]
    assert (positive["prompt"], negative["prompt"]) == ("make it snow", "")
    scaled = next(key for key, node in graph.items() if node["class_type"] == "ImageScaleToTotalPixels")
    assert positive["image1"] == [scaled, 0] and "image3" not in positive  # image1 scaled, image2 as loaded
    assert graph[sampler["latent_image"][0]]["class_type"] == "VAEEncode"


def test_the_workflow_holds_every_link_and_widget_of_the_graph():
    from stages.comfyui_graph import GraphModels, NODE_TYPES, api_graph, ui_workflow

    graph = api_graph(GraphModels("v", "t", "d", "default"), "p", "n", 7, ["a.png"],
                      params(reference_mode="raw_latent", width=512, height=384))
    workflow = ui_workflow(graph)
    assert len(workflow["nodes"]) == len(graph) and workflow["last_node_id"] == len(graph)
    connected = sum(isinstance(value, list) for node in graph.values() for value in node["inputs"].values())
    assert len(workflow["links"]) == connected == workflow["last_link_id"]
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        source_node = next(n for n in workflow["nodes"] if n["id"] == source)
        assert link_id in source_node["outputs"][slot]["links"] and source_node["outputs"][slot]["type"] == kind
        target_node = next(n for n in workflow["nodes"] if n["id"] == target)
        assert target_node["inputs"][target_slot]["link"] == link_id
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"] == [7, "fixed", 4, 1.0, "euler", "simple", 1.0]
    assert {n["type"] for n in workflow["nodes"]} <= set(NODE_TYPES)
    assert "EmptySD3LatentImage" in {n["type"] for n in workflow["nodes"]}
    assert "ReferenceLatent" in {n["type"] for n in workflow["nodes"]}
