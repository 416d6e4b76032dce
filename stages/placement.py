"""Putting a loaded model on the device as a memory profile says (stages/memory_profiles.py), with
the libraries' own mechanisms, and measuring what it then holds there.

- float8 storage: diffusers' layerwise casting (``enable_layerwise_casting`` on diffusers models,
  ``apply_layerwise_casting`` on the transformers text encoder): weights are stored as
  ``float8_e4m3fn`` and cast to the compute dtype layer by layer while the layer runs. Norms,
  patch and position embeddings keep the compute dtype (diffusers' default skip patterns).
- torchao: ``torchao.quantization.quantize_`` with the configured weight quantization.
- group offloading: diffusers' ``apply_group_offloading`` at block level, one block per group; on
  CUDA the next block is copied on a side stream while the current one computes.
- VAE tiling: the VAE's ``enable_tiling``.

A model's *device footprint* (what the model cache budgets) is measured on the placed model: the
bytes of its tensors, and for an offloaded model the largest set it brings to the device at once
(what lies outside its blocks plus two blocks: the running one and the prefetched next).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn

# torchao weight quantizations offered by the ``torchao_quantization`` setting: name -> (config
# class in torchao.quantization, bits per weight).
TORCHAO_CONFIGS = {
    "int8-weight": ("Int8WeightOnlyConfig", 8),
    "int8-dynamic": ("Int8DynamicActivationInt8WeightConfig", 8),
    "float8-weight": ("Float8WeightOnlyConfig", 8),
    "float8-dynamic": ("Float8DynamicActivationFloat8WeightConfig", 8),
}

# Modules the text encoder's offloading descends into to find its repeated blocks (Qwen2.5-VL:
# ``model.visual.blocks`` and ``model.language_model.layers``).
TEXT_ENCODER_BLOCK_MODULES = ("model", "visual", "language_model")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: tensor subclasses (torchao's quantized weights) by their inner
    tensors, the rest as ``numel * element_size`` (GGUF weights are uint8 blocks already)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module, recurse: bool = True) -> int:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return sum(tensor_bytes(t) for t in tensors)


def store_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """float8 storage, compute in ``compute_dtype`` (diffusers' layerwise casting)."""
    enable = getattr(model, "enable_layerwise_casting", None)
    if callable(enable):  # a diffusers model: its own skip patterns
        enable(storage_dtype=FP8, compute_dtype=compute_dtype)
        return
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=compute_dtype,
                            skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN)
    # transformers models report the dtype of their first floating parameter, and the pipeline
    # casts the prompt embeddings to it: that parameter (the vision patch embedding) must keep the
    # compute dtype.
    dtype = getattr(model, "dtype", compute_dtype)
    if dtype != compute_dtype:
        raise RuntimeError(f"float8 storage left {type(model).__name__}.dtype at {dtype}, not {compute_dtype}")


def quantize_torchao(model: torch.nn.Module, kind: str, device: Optional[torch.device]) -> None:
    """Quantize every linear layer's weights with torchao (``torchao_quantization``); with
    ``device``, each layer is moved there first and quantized there (torchao's ``device``), so the
    whole model never needs the device memory of its unquantized weights."""
    import torchao.quantization as quantization
    class_name, _ = TORCHAO_CONFIGS[kind]
    quantization.quantize_(model, getattr(quantization, class_name)(), device=device)


def place(model: torch.nn.Module, device: torch.device, offload: bool,
          block_modules: Optional[Iterable[str]] = None) -> None:
    """Move ``model`` to ``device``, or group-offload it: kept in host memory, each block brought
    to the device when it runs (prefetched on a CUDA stream where there is one)."""
    if not offload:
        model.to(device)
        return
    from diffusers.hooks import apply_group_offloading
    stream = device.type == "cuda"
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                           record_stream=stream, non_blocking=stream,
                           block_modules=list(block_modules) if block_modules else None)


def device_footprint(model: torch.nn.Module, offload: bool,
                     block_modules: Optional[Iterable[str]] = None) -> int:
    """Bytes the model holds on the device: all its tensors, or when offloaded the largest set
    brought there at once."""
    if not offload:
        return module_bytes(model)
    return _offload_window(model, set(block_modules or ()))


def _offload_window(module: torch.nn.Module, block_modules: set[str]) -> int:
    """Mirror of block-level group offloading: at each level, what is outside the blocks (one
    group, on the device while the level runs) plus the two largest blocks, plus the windows of
    the levels it descends into (they run inside it)."""
    outside = module_bytes(module, recurse=False)
    blocks: list[int] = []
    nested = 0
    for name, child in module.named_children():
        if name in block_modules:
            nested = max(nested, _offload_window(child, block_modules))
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks.extend(module_bytes(block) for block in child)
        else:
            outside += module_bytes(child)
    return outside + sum(sorted(blocks, reverse=True)[:2]) + nested


def set_footprint(model: Any, nbytes: int) -> None:
    """Tell the model cache what the model holds on the device (``model_cache.model_bytes`` reads
    ``nbytes``)."""
    model.nbytes = int(nbytes)
