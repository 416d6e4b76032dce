"""What the ComfyUI engine asks of ComfyUI, worked out without importing it.

The ComfyUI engine (``stages/comfyui_engine.py``) runs the reference workflow's nodes. This
module holds the pure part of that: which nodes a job needs, the arguments each node call gets
from the settings and the job parameters, the options ComfyUI boots with, the cache keys of the
loaded models, and the checks and conversions of the values (LATENT, CONDITIONING, IMAGE) that
cross stage boundaries. Nothing here imports ComfyUI, so all of it is tested everywhere.

ComfyUI's values, as stage payloads:

- LATENT: ``{"samples": Tensor[B, 16, 1, H/8, W/8]}`` (``EmptySD3LatentImage`` gives a 4-D
  ``Tensor[B, 16, H/8, W/8]`` that the sampler widens); optional ``noise_mask``/``batch_index``.
- CONDITIONING: ``[[Tensor[1, L, D], {"pooled_output": None, "reference_latents": [...], ...}]]``
  (an ``attention_mask`` may appear).
- IMAGE: ``float32 Tensor[B, H, W, 3]`` in 0..1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

# Every node the engine calls; a checkout lacking one is refused at boot.
REQUIRED_NODES = (
    "VAELoader", "CLIPLoader", "UNETLoader", "LoraLoaderModelOnly", "VAEEncode", "EmptySD3LatentImage",
    "TextEncodeQwenImageEditPlus", "ReferenceLatent", "ModelSamplingAuraFlow", "CFGNorm", "KSampler",
    "VAEDecode",
)
MINIMUM_VERSION = "0.3.60"  # TextEncodeQwenImageEditPlus appeared in the 0.3.60 series

# ComfyUI model folder (``folder_paths`` name) of each model the engine loads.
MODEL_FOLDERS = {"vae": "vae", "text_encoder": "text_encoders", "transformer": "diffusion_models",
                 "lora": "loras"}
CLIP_TYPE = "qwen_image"
MAX_IMAGES = 3

# Samplers whose state between steps is the latent alone and that draw no random numbers of
# their own (ComfyUI's ``sample_<name>`` k-diffusion functions without extra options): running
# them one step at a time gives the same bits as one call, so a run resumes from a saved latent.
STEPWISE_SAMPLER_FUNCTIONS = frozenset({"sample_euler", "sample_heun"})


class MappingError(ValueError):
    """Job parameters or settings that the ComfyUI engine cannot turn into node calls."""


@dataclass(frozen=True)
class NodeCall:
    """One node invocation: the node's class name and its keyword arguments (values, or a
    ``Ref`` naming a value the engine supplies: a loaded model, an image, an earlier result)."""

    node: str
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class Ref:
    """A placeholder for a runtime value in a ``NodeCall`` (``"vae"``, ``"clip"``, ``"image2"``...)."""

    name: str


# Booting ------------------------------------------------------------------------------------------

def boot_arguments(device: str, vram_mode: str, reserve_vram_gb: Optional[float], dtype: str,
                   cuda_available: bool) -> dict[str, Any]:
    """Attributes to set on ``comfy.cli_args.args`` before ComfyUI's model management loads.

    ``device``/``vram_mode``/``reserve_vram_gb``/``dtype`` are the daemon's settings of the same
    names; the result is what ComfyUI's ``--cpu``, ``--lowvram`` ... ``--reserve-vram``,
    ``--force-fp32``/``--bf16-unet``... flags would set. ``deterministic`` is always on.
    """
    args: dict[str, Any] = {"deterministic": True}
    on_cpu = device == "cpu" or (device == "auto" and not cuda_available)
    if device.startswith("cuda") and not cuda_available:
        raise MappingError(f"device {device!r} is configured but CUDA is not available")
    args["cpu"] = on_cpu
    for mode in ("lowvram", "normalvram", "highvram", "novram"):
        args[mode] = (vram_mode == mode) and not on_cpu
    if reserve_vram_gb is not None:
        args["reserve_vram"] = float(reserve_vram_gb)
    if dtype == "float32":
        args.update(force_fp32=True, fp32_unet=True, fp32_vae=True, fp32_text_enc=True)
    elif dtype == "bfloat16":
        args.update(bf16_unet=True, bf16_vae=True, bf16_text_enc=True)
    elif dtype == "float16":
        args.update(force_fp16=True, fp16_unet=True, fp16_vae=True, fp16_text_enc=True)
    elif dtype != "auto":
        raise MappingError(f"unknown dtype {dtype!r}")
    return args


# ComfyUI options (argparse ``dest`` names) that its server or its ``main.py`` acts on, not the
# library: accepted, with a warning that they change nothing here.
SERVER_ONLY_OPTIONS = frozenset({
    "listen", "port", "tls_keyfile", "tls_certfile", "enable_cors_header", "max_upload_size", "output_directory",
    "temp_directory", "input_directory", "user_directory", "auto_launch", "disable_auto_launch", "preview_method",
    "preview_size", "cache_classic", "cache_lru", "cache_none", "dont_print_server", "quick_test_for_ci",
    "windows_standalone_build", "disable_api_nodes", "multi_user", "verbose", "log_stdout",
    "enable_compress_response_body", "database_url", "front_end_version", "front_end_root", "comfy_api_base",
})
# Options ``main.py`` turns into environment variables before torch is imported: too late in a
# daemon that has imported torch; the message says what to do instead.
BEFORE_TORCH_OPTIONS = {
    "cuda_device": "set device = \"cuda:N\" (or CUDA_VISIBLE_DEVICES in the daemon's environment)",
    "default_device": "set device = \"cuda:N\" (or CUDA_VISIBLE_DEVICES in the daemon's environment)",
    "oneapi_device_selector": "set ONEAPI_DEVICE_SELECTOR in the daemon's environment",
    "cuda_malloc": "set PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync in the daemon's environment",
    "disable_cuda_malloc": "leave PYTORCH_CUDA_ALLOC_CONF unset in the daemon's environment",
}


def user_arguments(parser: Any, flags: Sequence[str]) -> dict[str, Any]:
    """The options a user gives ComfyUI (setting ``comfyui_args``), parsed by ComfyUI's own
    ``comfy.cli_args.parser``: each option whose value differs from the parser's default, by its
    attribute name. MappingError naming the flags for unknown options, bad values and options
    that cannot work once torch is imported."""
    import contextlib
    import io

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed, unknown = parser.parse_known_args(list(flags))
            defaults = parser.parse_args([])
    except SystemExit:
        message = (errors.getvalue().strip().splitlines() or ["invalid"])[-1]
        raise MappingError(f"comfyui_args {list(flags)}: {message}") from None
    if unknown:
        raise MappingError(f"comfyui_args: ComfyUI has no option {' '.join(unknown)} (see python main.py --help "
                           "in the checkout)")
    given = {name: value for name, value in vars(parsed).items() if value != getattr(defaults, name, None)}
    refused = [f"--{name.replace('_', '-')}: {hint}" for name, hint in BEFORE_TORCH_OPTIONS.items() if name in given]
    if refused:
        raise MappingError("comfyui_args: ComfyUI applies these before importing torch, too late for the "
                           "daemon; " + "; ".join(refused))
    return given


def cuda_index(device: str) -> Optional[int]:
    """The CUDA device number in ``cuda:N``; None for ``cuda``, ``auto`` and ``cpu``."""
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.strip().lstrip("v").split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


# Loaders -----------------------------------------------------------------------------------------

def vae_loader(vae_name: str) -> NodeCall:
    return NodeCall("VAELoader", {"vae_name": vae_name})


def clip_loader(text_encoder_name: str) -> NodeCall:
    return NodeCall("CLIPLoader", {"clip_name": text_encoder_name, "type": CLIP_TYPE, "device": "default"})


def unet_loader(diffusion_model_name: str, weight_dtype: str) -> NodeCall:
    return NodeCall("UNETLoader", {"unet_name": diffusion_model_name, "weight_dtype": weight_dtype})


def model_patches(params: Any) -> list[NodeCall]:
    """LoraLoaderModelOnly (when a LoRA is set), ModelSamplingAuraFlow, CFGNorm: in this order,
    each taking the previous one's model as ``model``."""
    calls = []
    if params.lora:
        calls.append(NodeCall("LoraLoaderModelOnly", {"model": Ref("model"), "lora_name": params.lora,
                                                      "strength_model": float(params.lora_strength)}))
    calls.append(NodeCall("ModelSamplingAuraFlow", {"model": Ref("model"), "shift": float(params.shift)}))
    calls.append(NodeCall("CFGNorm", {"model": Ref("model"), "strength": float(params.cfg_norm_strength)}))
    return calls


# Stages ------------------------------------------------------------------------------------------

def latent_source(params: Any) -> NodeCall:
    """The sampler's starting latent: VAEEncode of image1, or EmptySD3LatentImage for a custom size."""
    if (params.width is None) != (params.height is None):
        raise MappingError("width and height must be given together")
    if params.width is not None:
        return NodeCall("EmptySD3LatentImage", {"width": int(params.width), "height": int(params.height),
                                                "batch_size": 1})
    return NodeCall("VAEEncode", {"pixels": Ref("image1"), "vae": Ref("vae")})


def text_encode_calls(reference_mode: str, prompt: str, image_count: int) -> list[NodeCall]:
    """The node calls that make one CONDITIONING (positive or negative) for ``prompt``.

    ``scaled`` (the template): TextEncodeQwenImageEditPlus with the VAE, which rescales each image
    to about 1 MP for its reference latent. ``raw_latent``: TextEncodeQwenImageEditPlus without
    the VAE, then one ReferenceLatent per image with that image VAE-encoded at its own size
    (``Ref("latent<i>")``). Every call after the first takes the previous CONDITIONING as
    ``conditioning``.
    """
    if not 1 <= image_count <= MAX_IMAGES:
        raise MappingError(f"between 1 and {MAX_IMAGES} images, not {image_count}")
    images = {f"image{i}": Ref(f"image{i}") for i in range(1, image_count + 1)}
    if reference_mode == "scaled":
        return [NodeCall("TextEncodeQwenImageEditPlus", {"clip": Ref("clip"), "prompt": prompt,
                                                          "vae": Ref("vae"), **images})]
    if reference_mode == "raw_latent":
        calls = [NodeCall("TextEncodeQwenImageEditPlus", {"clip": Ref("clip"), "prompt": prompt, **images})]
        for i in range(1, image_count + 1):
            calls.append(NodeCall("ReferenceLatent", {"conditioning": Ref("conditioning"),
                                                      "latent": Ref(f"latent{i}")}))
        return calls
    raise MappingError(f"unknown reference_mode {reference_mode!r}")


def ksampler_arguments(params: Any, seed: int) -> dict[str, Any]:
    """KSampler's widget values for a job (model, conditioning and latent come separately)."""
    return {"seed": int(seed), "steps": int(params.steps), "cfg": float(params.cfg),
            "sampler_name": params.sampler, "scheduler": params.scheduler, "denoise": float(params.denoise)}


def negative_unused(cfg: float) -> bool:
    """Whether KSampler leaves the negative conditioning unused at this cfg: ComfyUI's sampling
    function skips it when cfg is (math.isclose) 1 and no model patch asks otherwise (the
    patches here do not: LoRA, ModelSamplingAuraFlow, CFGNorm's post-CFG function)."""
    return math.isclose(float(cfg), 1.0)


def sampler_negative(text: Mapping[str, Any], cfg: float) -> Any:
    """The negative CONDITIONING to hand the sampler. When the negative was not encoded because
    it is unused at this cfg, the positive stands in: the sampler only reads its reference
    latents' shapes (for its memory estimate), which are the positive's, since both encodings
    see the same images; the result is the same bits as with the encoded negative."""
    negative = text.get("negative")
    if negative is not None:
        return negative
    if not negative_unused(cfg):
        raise MappingError(f"cfg {cfg} needs the negative conditioning, which this encode_text result lacks")
    return text["positive"]


def check_sampler(sampler: str, scheduler: str, samplers: Sequence[str], schedulers: Sequence[str]) -> None:
    """KSampler quietly falls back to its first sampler/scheduler for an unknown name; refuse instead."""
    if sampler not in samplers:
        raise MappingError(f"unknown sampler {sampler!r}; ComfyUI offers: {', '.join(samplers)}")
    if scheduler not in schedulers:
        raise MappingError(f"unknown scheduler {scheduler!r}; ComfyUI offers: {', '.join(schedulers)}")


# Model identities and cache keys -----------------------------------------------------------------

def file_identity(name: str, size: int, mtime_ns: int) -> str:
    return f"{name} bytes={size} mtime_ns={mtime_ns}"


def transformer_identity(model: str, weight_dtype: str, lora: Optional[str], lora_strength: float) -> str:
    """The diffusion model's identity: its file, the weight dtype it is loaded in and the LoRA."""
    text = f"{model}; weight_dtype={weight_dtype}"
    if lora is None:
        return text + "; lora none"
    return text + f"; lora {lora} strength={float(lora_strength)!r}"


def cache_key(role: str, identity: str, params: Any = None) -> tuple:
    """ModelCache key: the patched diffusion model also depends on shift and CFGNorm strength."""
    if role == "transformer":
        return ("comfyui", role, identity, float(params.shift), float(params.cfg_norm_strength))
    return ("comfyui", role, identity)


# Values across stage boundaries ------------------------------------------------------------------

def to_comfy_image(image: Any) -> Any:
    """A prepared image (an array or a tensor) -> ComfyUI IMAGE ``float32 [1, H, W, 3]``:
    ``uint8 [H, W, 3]`` with the same arithmetic as ComfyUI's LoadImage (``float32 / 255``);
    ``float32 [H, W, 3]`` (ImageScaleToTotalPixels' values for a float method) as it is."""
    import numpy as np
    import torch

    pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if pixels.dtype not in (np.uint8, np.float32) or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise MappingError("a prepared image must be uint8 or float32 [H, W, 3]")
    if pixels.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(pixels))[None,]
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None,]


def saved_pixels(image: Any) -> Any:
    """The 8-bit pixels ComfyUI's SaveImage writes for an IMAGE: ``clip(255 * i, 0, 255)``
    truncated to uint8 (``[H, W, 3]``)."""
    import numpy as np

    return np.clip(255.0 * from_comfy_image(image).numpy(), 0, 255).astype(np.uint8)


def saved_pixels16(image: Any) -> Any:
    """ComfyUI IMAGE -> uint16 ``[H, W, 3]``: the float pixels rounded to 16 bits (SaveImage
    has no 16-bit mode; this keeps what the VAE's float output carries beyond 8 bits)."""
    import numpy as np
    return np.clip(np.rint(65535.0 * from_comfy_image(image).double().numpy()), 0, 65535).astype(np.uint16)


def from_comfy_image(image: Any) -> Any:
    """ComfyUI IMAGE ``[1, H, W, 3]`` (or ``[H, W, 3]``) -> ``float32 [H, W, 3]`` on the CPU."""
    import torch

    if image.ndim == 4:
        if image.shape[0] != 1:
            raise MappingError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.ndim != 3 or image.shape[-1] < 3:
        raise MappingError(f"not an IMAGE tensor: shape {tuple(image.shape)}")
    return image[..., :3].to(device="cpu", dtype=torch.float32).contiguous()


def check_latent(latent: Any) -> dict:
    """A LATENT payload: a dict with a ``samples`` tensor of 4 or 5 dimensions."""
    import torch

    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise MappingError("a LATENT must be a dict with a 'samples' tensor")
    if latent["samples"].ndim not in (4, 5):
        raise MappingError(f"LATENT samples must have 4 or 5 dimensions, not {latent['samples'].ndim}")
    return latent


def check_conditioning(conditioning: Any) -> list:
    """A CONDITIONING payload: a list of ``[Tensor, dict]`` whose dicts a checkpoint can hold."""
    import torch

    if not isinstance(conditioning, list) or not conditioning:
        raise MappingError("a CONDITIONING must be a non-empty list")
    for entry in conditioning:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor)
                or not isinstance(entry[1], dict)):
            raise MappingError("each CONDITIONING entry must be [Tensor, dict]")
        _check_storable(entry[1], "CONDITIONING options")
    return conditioning


def _check_storable(value: Any, where: str) -> None:
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MappingError(f"{where}: key {key!r} is not a string")
            _check_storable(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_storable(item, where)
        return
    raise MappingError(f"{where}: a {type(value).__name__} cannot be checkpointed (hooks, masks "
                       "or other node options this pipeline does not use?)")
