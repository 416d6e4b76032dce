"""A job as a ComfyUI graph: the template's nodes with the job's values, in ComfyUI's two formats.

- ``api_graph``: the API ("prompt") format that ComfyUI's executor runs and its SaveImage writes
  into a PNG's ``prompt`` text chunk: ``{"<id>": {"class_type": ..., "inputs": {...}}}`` with
  links as ``["<id>", output index]``.
- ``ui_workflow``: the editor ("workflow") format that the ComfyUI page loads when a PNG is
  dropped on it: nodes with their widget values in the node's input order, and links.

The published PNG of a ComfyUI job carries both (``prompt`` and ``workflow`` chunks, as
SaveImage writes them), so dragging it into ComfyUI loads the workflow that made it, and
running that workflow gives the same pixels (tests/test_comfyui_engine.py runs it through
ComfyUI's executor). The nodes and their arguments are the engine's own
(``stages/comfyui_nodes.py``); nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from stages import comfyui_nodes as mapping
from stages.comfyui_nodes import NodeCall, Ref

# Every node a job graph holds: its inputs in the order ComfyUI declares them (required, then
# optional) with their types, and its output types. Inputs of a plain type (COMBO, INT, FLOAT,
# STRING) are widgets in the editor; the others are sockets. Checked against the checkout's
# own declarations in tests/test_comfyui_engine.py.
NODE_TYPES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "UNETLoader": ((("unet_name", "COMBO"), ("weight_dtype", "COMBO")), ("MODEL",)),
    "CLIPLoader": ((("clip_name", "COMBO"), ("type", "COMBO"), ("device", "COMBO")), ("CLIP",)),
    "VAELoader": ((("vae_name", "COMBO"),), ("VAE",)),
    "LoraLoaderModelOnly": ((("model", "MODEL"), ("lora_name", "COMBO"), ("strength_model", "FLOAT")), ("MODEL",)),
    "ModelSamplingAuraFlow": ((("model", "MODEL"), ("shift", "FLOAT")), ("MODEL",)),
    "CFGNorm": ((("model", "MODEL"), ("strength", "FLOAT")), ("MODEL",)),
    "LoadImage": ((("image", "COMBO"),), ("IMAGE", "MASK")),
    "ImageScaleToTotalPixels": ((("image", "IMAGE"), ("upscale_method", "COMBO"), ("megapixels", "FLOAT")),
                                ("IMAGE",)),
    "TextEncodeQwenImageEditPlus": ((("clip", "CLIP"), ("prompt", "STRING"), ("vae", "VAE"), ("image1", "IMAGE"),
                                     ("image2", "IMAGE"), ("image3", "IMAGE")), ("CONDITIONING",)),
    "ReferenceLatent": ((("conditioning", "CONDITIONING"), ("latent", "LATENT")), ("CONDITIONING",)),
    "VAEEncode": ((("pixels", "IMAGE"), ("vae", "VAE")), ("LATENT",)),
    "EmptySD3LatentImage": ((("width", "INT"), ("height", "INT"), ("batch_size", "INT")), ("LATENT",)),
    "KSampler": ((("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
                  ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT"), ("denoise", "FLOAT")), ("LATENT",)),
    "VAEDecode": ((("samples", "LATENT"), ("vae", "VAE")), ("IMAGE",)),
    "SaveImage": ((("images", "IMAGE"), ("filename_prefix", "STRING")), ()),
}
WIDGET_TYPES = frozenset({"COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"})
# Widgets the editor adds after an input's own value: KSampler's "control after generate" (kept
# "fixed", so a workflow loaded from the PNG runs with the job's seed) and LoadImage's upload button.
EXTRA_WIDGETS = {("KSampler", "seed"): "fixed", ("LoadImage", "image"): "image"}
FILENAME_PREFIX = "ComfyUI"  # the template's SaveImage prefix


@dataclass(frozen=True)
class GraphModels:
    """The model files a job graph loads (the engine's settings)."""

    vae: str
    text_encoder: str
    diffusion_model: str
    weight_dtype: str


def api_graph(models: GraphModels, prompt: str, negative_prompt: str, seed: int, images: Sequence[str],
              params: Any, filename_prefix: str = FILENAME_PREFIX) -> dict[str, dict[str, Any]]:
    """The job as ComfyUI's API graph: the template's nodes with the job's values; ``images``
    are the LoadImage file names (image1 first)."""
    graph = _Builder()
    model = graph.add(mapping.unet_loader(models.diffusion_model, models.weight_dtype))
    for call in mapping.model_patches(params):
        model = graph.add(call, model=model)
    clip = graph.add(mapping.clip_loader(models.text_encoder))
    vae = graph.add(mapping.vae_loader(models.vae))
    loaded = [graph.add(NodeCall("LoadImage", {"image": name})) for name in images]
    scaled = graph.add(NodeCall("ImageScaleToTotalPixels", {"image": Ref("image"),
                                                            "upscale_method": params.upscale_method,
                                                            "megapixels": float(params.megapixels)}), image=loaded[0])
    refs: dict[str, list] = {"image1": scaled, "clip": clip, "vae": vae}
    refs.update({f"image{i}": link for i, link in enumerate(loaded[1:], start=2)})
    latent = graph.add(mapping.latent_source(params), **refs)
    if params.reference_mode == "raw_latent":
        for i in range(1, len(images) + 1):
            refs[f"latent{i}"] = graph.add(NodeCall("VAEEncode", {"pixels": Ref(f"image{i}"), "vae": Ref("vae")}),
                                           **refs)
    conditioning = {}
    for label, text in (("positive", prompt), ("negative", negative_prompt)):
        link = None
        for call in mapping.text_encode_calls(params.reference_mode, text, len(images)):
            link = graph.add(call, **refs, conditioning=link)
        conditioning[label] = link
    sampler = graph.add(NodeCall("KSampler", {"model": Ref("model"), **mapping.ksampler_arguments(params, seed),
                                              "positive": Ref("positive"), "negative": Ref("negative"),
                                              "latent_image": Ref("latent")}),
                        model=model, latent=latent, **conditioning)
    decoded = graph.add(NodeCall("VAEDecode", {"samples": Ref("samples"), "vae": Ref("vae")}), samples=sampler, vae=vae)
    graph.add(NodeCall("SaveImage", {"images": Ref("images"), "filename_prefix": filename_prefix}), images=decoded)
    return graph.nodes


class _Builder:
    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, call: NodeCall, **links: Optional[list]) -> list:
        """Add ``call`` with its Refs replaced by ``links``; its first output's link."""
        node_id = str(len(self.nodes) + 1)
        inputs = {}
        for key, value in call.kwargs.items():
            inputs[key] = links[value.name] if isinstance(value, Ref) else value
        self.nodes[node_id] = {"class_type": call.node, "inputs": inputs, "_meta": {"title": call.node}}
        return [node_id, 0]


def ui_workflow(graph: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The editor's workflow for an API graph: the same nodes, their widget values in input
    order, one link per connected socket, laid out left to right by depth."""
    depth = _depths(graph)
    columns: dict[int, int] = {}
    nodes, links = [], []
    outputs: dict[str, list[list[int]]] = {node_id: [[] for _ in NODE_TYPES[node["class_type"]][1]]
                                           for node_id, node in graph.items()}
    for node_id, node in graph.items():
        kind = node["class_type"]
        declared, _ = NODE_TYPES[kind]
        inputs, widgets = [], []
        for name, input_type in declared:
            value = node["inputs"].get(name)
            if input_type in WIDGET_TYPES:
                widgets.append(value)
                if (kind, name) in EXTRA_WIDGETS:
                    widgets.append(EXTRA_WIDGETS[(kind, name)])
                continue
            link_id = None
            if value is not None:
                link_id = len(links) + 1
                source, slot = value
                links.append([link_id, int(source), slot, int(node_id), len(inputs), input_type])
                outputs[source][slot].append(link_id)
            inputs.append({"name": name, "type": input_type, "link": link_id})
        row = columns.get(depth[node_id], 0)
        columns[depth[node_id]] = row + 1
        nodes.append({"id": int(node_id), "type": kind, "pos": [40 + 360 * depth[node_id], 40 + 200 * row],
                      "size": [320, 160], "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": kind}, "widgets_values": widgets})
    for node in nodes:
        node["outputs"] = [{"name": output_type, "type": output_type, "links": outputs[str(node["id"])][slot],
                            "slot_index": slot}
                           for slot, output_type in enumerate(NODE_TYPES[node["type"]][1])]
    return {"last_node_id": max(int(i) for i in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _depths(graph: dict[str, dict[str, Any]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(node_id: str) -> int:
        if node_id not in depth:
            sources = [value[0] for value in graph[node_id]["inputs"].values() if isinstance(value, list)]
            depth[node_id] = 1 + max((of(source) for source in sources), default=-1)
        return depth[node_id]

    for node_id in graph:
        of(node_id)
    return depth


def png_text(graph: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The text chunks SaveImage writes for a graph: ``prompt`` (API graph) and ``workflow``."""
    return {"prompt": json.dumps(graph), "workflow": json.dumps(ui_workflow(graph))}
