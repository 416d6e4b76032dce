"""Tiny random-weight Qwen-Image-Edit models in ComfyUI's file formats (test code only).

ComfyUI hard-codes most Qwen-Image sizes: the diffusion transformer's heads and widths, the 7B
text encoder with its vision tower, the VAE's channel count. A model small enough for a test
therefore needs those sizes changed. ``install()`` does that by patching four ComfyUI classes
right after their modules are imported (a post-import hook, so it can be installed before
ComfyUI is booted and does not import anything of ComfyUI itself). ComfyUI's loaders, nodes and
samplers then run unchanged on the tiny files that ``build_models()`` writes.

In another process (a daemon started by a test) the same patches are installed with::

    COMFYUI_TINY_MODELS=/tmp/models python tests/comfyui_tiny.py run.py serve --once ...

which installs the hook and then runs the named script with the remaining arguments. With
``COMFYUI_TINY_MODELS`` set, the model folders under it (``vae/``, ``text_encoders/``,
``diffusion_models/``, ``loras/``) are also added to ComfyUI's search paths when its
``folder_paths`` module loads, so that the process finds the tiny files.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Callable

# Sizes of the tiny models.
TEXT_HIDDEN = 32          # text encoder width = the diffusion model's joint_attention_dim
VISION_HIDDEN = 32
DIT_HEADS = 2
DIT_HEAD_DIM = 16
DIT_ROPE = (4, 6, 6)      # sums to DIT_HEAD_DIM
DIT_LAYERS = 1
VAE_DIM = 4
VAE_RES_BLOCKS = 1

FILE_NAMES = {
    "vae": "tiny_qwen_image_vae.safetensors",
    "text_encoder": "tiny_qwen_2.5_vl.safetensors",
    "diffusion_model": "tiny_qwen_image_edit_2509.safetensors",
    "lora": "tiny_lightning_lora.safetensors",
}
MODELS_ENV = "COMFYUI_TINY_MODELS"
MODEL_FOLDERS = ("vae", "text_encoders", "diffusion_models", "loras")


# The patches -------------------------------------------------------------------------------------

def _patch_supported_models(module: Any) -> None:
    module.QwenImage.unet_extra_config = {
        "attention_head_dim": DIT_HEAD_DIM,
        "num_attention_heads": DIT_HEADS,
        "joint_attention_dim": TEXT_HIDDEN,
        "axes_dims_rope": DIT_ROPE,
    }


def _patch_llama(module: Any) -> None:
    original = module.Qwen25_7BVLI_Config
    if getattr(original, "_qie_tiny", False):
        return

    @dataclasses.dataclass
    class TinyQwen25VLConfig(original):
        hidden_size: int = TEXT_HIDDEN
        intermediate_size: int = 64
        num_hidden_layers: int = 2
        num_attention_heads: int = 4
        num_key_value_heads: int = 4   # 4 x head_dim 128 = 512: how ComfyUI recognises the 7B
        _qie_tiny = True

    module.Qwen25_7BVLI_Config = TinyQwen25VLConfig


def _patch_qwen_vl(module: Any) -> None:
    original = module.Qwen2VLVisionTransformer
    if getattr(original, "_qie_tiny", False):
        return

    class TinyVisionTransformer(original):
        _qie_tiny = True

        def __init__(self, hidden_size=None, output_hidden_size=None, intermediate_size=None,
                     num_heads=None, num_layers=None, **kwargs):
            super().__init__(hidden_size=VISION_HIDDEN, output_hidden_size=output_hidden_size,
                             intermediate_size=64, num_heads=2, num_layers=1, **kwargs)

    module.Qwen2VLVisionTransformer = TinyVisionTransformer


def _patch_wan_vae(module: Any) -> None:
    original = module.WanVAE
    if getattr(original, "_qie_tiny", False):
        return

    class TinyWanVAE(original):
        _qie_tiny = True

        def __init__(self, dim=None, num_res_blocks=None, **kwargs):
            super().__init__(dim=VAE_DIM, num_res_blocks=VAE_RES_BLOCKS, **kwargs)
            # The middle self-attention over every latent pixel dominates a CPU encode at the
            # ~1 MP that TextEncodeQwenImageEditPlus uses; the tiny VAE goes without it.
            import torch
            for coder in (self.encoder, self.decoder):
                coder.middle[1] = torch.nn.Identity()

    module.WanVAE = TinyWanVAE


def _patch_folder_paths(module: Any) -> None:
    root = os.environ.get(MODELS_ENV)
    if root:
        for folder in MODEL_FOLDERS:
            module.add_model_folder_path(folder, os.path.join(root, folder))


PATCHES: dict[str, Callable[[Any], None]] = {
    "folder_paths": _patch_folder_paths,
    "comfy.supported_models": _patch_supported_models,
    "comfy.text_encoders.llama": _patch_llama,
    "comfy.text_encoders.qwen_vl": _patch_qwen_vl,
    "comfy.ldm.wan.vae": _patch_wan_vae,
}


class _PostImportPatcher(importlib.abc.MetaPathFinder):
    """Finds the patched modules through the other finders and patches them once executed."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module, _execute=execute, _name=name):
            _execute(module)
            PATCHES[_name](module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Shrink ComfyUI's Qwen-Image classes, now for imported modules, on import for the rest."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PostImportPatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportPatcher())


# Building the files (ComfyUI must be booted and ``install()`` active) -----------------------------

def _randomised(state: dict, seed: int, scale: float = 0.05) -> dict:
    import torch
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in sorted(state.items()):
        if not value.is_floating_point():
            out[name] = value.clone()
            continue
        leaf = name.rsplit(".", 1)[-1]
        if value.ndim == 1 and ("norm" in name or leaf in ("gamma", "scale")):
            out[name] = torch.ones(value.shape, dtype=torch.float32)
        elif leaf == "bias" or value.ndim == 1:
            out[name] = torch.randn(value.shape, generator=generator) * 0.01
        else:
            out[name] = torch.randn(value.shape, generator=generator) * scale
    return {k: v.contiguous() for k, v in out.items()}


def build_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny VAE, text encoder, diffusion model and LoRA under ``root`` in ComfyUI's layout.

    Returns the written paths by role. Needs ComfyUI booted (on ``sys.path``, ``comfy.cli_args``
    set) and ``install()`` active.
    """
    import torch
    from safetensors.torch import save_file

    install()
    import comfy.ldm.qwen_image.model as qwen_dit
    import comfy.ldm.wan.vae as wan_vae
    import comfy.ops
    import comfy.text_encoders.llama as llama

    ops = comfy.ops.disable_weight_init
    paths = {
        "vae": root / "vae" / FILE_NAMES["vae"],
        "text_encoder": root / "text_encoders" / FILE_NAMES["text_encoder"],
        "diffusion_model": root / "diffusion_models" / FILE_NAMES["diffusion_model"],
        "lora": root / "loras" / FILE_NAMES["lora"],
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    vae = wan_vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                         temperal_downsample=[False, True, True], dropout=0.0)
    save_file(_randomised(vae.state_dict(), seed + 1, 0.1), str(paths["vae"]))

    text = llama.Qwen25_7BVLI({}, dtype=torch.float32, device="cpu", operations=ops)
    save_file(_randomised(text.state_dict(), seed + 2), str(paths["text_encoder"]))

    dit = qwen_dit.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=DIT_LAYERS,
        attention_head_dim=DIT_HEAD_DIM, num_attention_heads=DIT_HEADS,
        joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=DIT_ROPE, image_model="qwen_image",
        dtype=torch.float32, device="cpu", operations=ops)
    dit_state = _randomised(dit.state_dict(), seed + 3, 0.1)
    save_file(dit_state, str(paths["diffusion_model"]))

    # A LoRA on every attention projection of the first block, in the common
    # ``diffusion_model.<module>.lora_up/lora_down`` naming.
    generator = torch.Generator().manual_seed(seed + 4)
    lora = {}
    rank = 4
    for name, value in dit_state.items():
        if name.startswith("transformer_blocks.0.attn.") and name.endswith(".weight") and value.ndim == 2:
            module = name[:-len(".weight")]
            out_features, in_features = value.shape
            lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.5
            lora[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
    save_file(lora, str(paths["lora"]))
    return paths


def main(argv: list[str]) -> None:
    """``python tests/comfyui_tiny.py SCRIPT ARGS...``: run SCRIPT with the tiny patches active."""
    if not argv:
        raise SystemExit("usage: comfyui_tiny.py SCRIPT [ARGS...]")
    install()
    sys.argv = list(argv)
    script = Path(argv[0]).resolve()
    # The script's folder replaces this file's folder, as if the script had been run directly.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
