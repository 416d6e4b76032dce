"""Memory profiles of the diffusers engine: how each model is held on the device, and the ``auto``
choice between them.

A profile says, for each model role, how its weights are stored and where they live:

- storage: in the compute dtype (``compute``); as float8 e4m3 with every layer computing in the
  compute dtype (``fp8``: diffusers' layerwise casting); from a GGUF file (``gguf``: diffusers'
  ``GGUFQuantizationConfig``); quantized by torchao at load (``torchao``);
- offloading: a group-offloaded model lives in host memory and is brought to the device one block
  at a time, the next block prefetched on a CUDA stream (diffusers' ``apply_group_offloading``);
- VAE tiling: the VAE encodes and decodes in overlapping tiles (less memory on large images).

A profile that changes the numbers (a storage other than ``compute``, VAE tiling) is part of the
identity of the models it changes, and so of every checkpoint fingerprint they shape;
offloading moves the same weights at other times and changes no number, so it is not.

This module is pure (no torch): ``choose_profile`` decides from the device's free memory and the
model files' sizes, so it is tested without a GPU. ``stages/placement.py`` applies a profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

GiB = 1024 ** 3
ROLES = ("vae", "text_encoder", "transformer")

# While an offloaded model runs, the device holds what lies outside its repeated blocks (embeddings,
# the text encoder's lm_head, norms) plus two blocks (the running one and the prefetched next).
# Shares of the whole model, from the published configurations: the transformer's 60 blocks make up
# nearly all of it (2/60 + ~1% outside); the text encoder's 152064 x 3584 embedding and lm_head are
# 13% of its 8.3 B parameters, two of its 28 layers another 6%.
OFFLOAD_WINDOW = {"transformer": 0.05, "text_encoder": 0.2, "vae": 1.0}

# Room for activations and the allocator's slack beside the weights while each model runs, at a
# job file's default size (1 MP): sampling and the VAE work on 1 MP images, the text encoder on a
# prompt and 384x384 reference images. Estimates for the choice, not measurements.
HEADROOM = {"transformer": 2 * GiB, "vae": 2 * GiB, "text_encoder": GiB // 2}


class Storage(str, Enum):
    COMPUTE = "compute"   # the compute dtype (bfloat16 on CUDA)
    FP8 = "fp8"           # float8 e4m3 storage, compute dtype arithmetic (layerwise casting)
    GGUF = "gguf"         # the weights of a GGUF file (``gguf_file``), dequantized per layer
    TORCHAO = "torchao"   # torchao quantization at load (``torchao_quantization``)


@dataclass(frozen=True)
class MemoryProfile:
    name: str
    summary: str
    transformer: Storage = Storage.COMPUTE
    text_encoder: Storage = Storage.COMPUTE
    offloaded: frozenset[str] = frozenset()  # roles kept in host memory and group-offloaded
    vae_tiling: bool = False

    def storage(self, role: str) -> Storage:
        return getattr(self, role) if role in ("transformer", "text_encoder") else Storage.COMPUTE

    def changes_numbers(self, role: str, vae_tiling: Optional[bool] = None) -> bool:
        """Whether this profile makes ``role``'s results differ from ``full``'s."""
        if role == "vae":
            return self.tiles(vae_tiling)
        return self.storage(role) is not Storage.COMPUTE

    def tiles(self, vae_tiling: Optional[bool] = None) -> bool:
        """VAE tiling in force: the ``vae_tiling`` setting when set, else the profile's."""
        return self.vae_tiling if vae_tiling is None else vae_tiling


_OFFLOAD_BOTH = frozenset({"transformer", "text_encoder"})
_OFFLOAD_TEXT = frozenset({"text_encoder"})

PROFILES: dict[str, MemoryProfile] = {p.name: p for p in (
    MemoryProfile("full", "every model in the compute dtype on the device (cards with room for all of them)"),
    MemoryProfile("fp8", "diffusion model and text encoder stored as float8, computing in the compute dtype, "
                         "all on the device (about 30 GB with the real model)",
                  Storage.FP8, Storage.FP8),
    MemoryProfile("fp8-offload-text", "float8 storage; the diffusion model stays on the device, the text "
                                      "encoder is group-offloaded; VAE tiling (24 GB cards)",
                  Storage.FP8, Storage.FP8, _OFFLOAD_TEXT, True),
    MemoryProfile("fp8-offload", "float8 storage; diffusion model and text encoder group-offloaded with "
                                 "prefetching; VAE tiling (16 GB cards and smaller)",
                  Storage.FP8, Storage.FP8, _OFFLOAD_BOTH, True),
    MemoryProfile("offload", "the compute dtype (the same results as full), diffusion model and text encoder "
                             "group-offloaded with prefetching (small cards, exact results, needs host memory "
                             "for both models)",
                  offloaded=_OFFLOAD_BOTH),
    MemoryProfile("gguf", "the diffusion model from `gguf_file` on the device; text encoder as in "
                          "fp8-offload-text; VAE tiling",
                  Storage.GGUF, Storage.FP8, _OFFLOAD_TEXT, True),
    MemoryProfile("torchao", "the diffusion model quantized by torchao (`torchao_quantization`) on the device; "
                             "text encoder as in fp8-offload-text; VAE tiling",
                  Storage.TORCHAO, Storage.FP8, _OFFLOAD_TEXT, True),
)}

# What ``auto`` tries, best results first; the first that fits the free memory is taken.
AUTO_ORDER = ("full", "fp8", "fp8-offload-text", "fp8-offload")


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each role's weights in the compute dtype (what ``full`` holds), read from the
    model files; ``gguf`` is the GGUF file's size when one is configured."""

    vae: int
    text_encoder: int
    transformer: int
    compute_bits: int = 16
    gguf: Optional[int] = None
    torchao_bits: int = 8

    def of(self, role: str) -> int:
        return int(getattr(self, role))


def stored_bytes(profile: MemoryProfile, role: str, sizes: ModelSizes) -> int:
    """Bytes of ``role``'s weights as the profile stores them (on the device or in host memory)."""
    storage = profile.storage(role)
    if storage is Storage.GGUF:
        return int(sizes.gguf or 0)
    if storage is Storage.FP8:
        return sizes.of(role) * 8 // sizes.compute_bits
    if storage is Storage.TORCHAO:
        return sizes.of(role) * sizes.torchao_bits // sizes.compute_bits
    return sizes.of(role)


def device_bytes(profile: MemoryProfile, role: str, sizes: ModelSizes) -> int:
    """What ``role`` holds on the device: all of it, or an offloaded model's window while it runs."""
    stored = stored_bytes(profile, role, sizes)
    if role in profile.offloaded:
        return int(stored * OFFLOAD_WINDOW[role])
    return stored


def host_bytes(profile: MemoryProfile, sizes: ModelSizes) -> int:
    """Host memory the offloaded models take."""
    return sum(stored_bytes(profile, role, sizes) for role in profile.offloaded)


def peak_estimate(profile: MemoryProfile, sizes: ModelSizes) -> int:
    """Device memory a job needs with every model loaded: the resident models, plus, in the stage
    that needs most, the running model's window when it is offloaded and its ``HEADROOM``."""
    resident = sum(device_bytes(profile, role, sizes) for role in ROLES if role not in profile.offloaded)
    running = max((device_bytes(profile, role, sizes) if role in profile.offloaded else 0) + HEADROOM[role]
                  for role in ROLES)
    return resident + running


@dataclass(frozen=True)
class Choice:
    profile: MemoryProfile
    reason: str
    peak: int  # the estimate for the chosen profile, bytes


def choose_profile(device_type: str, free_bytes: Optional[int], sizes: ModelSizes,
                   gguf_configured: bool = False, host_free_bytes: Optional[int] = None) -> Choice:
    """The ``auto`` profile: the first of ``AUTO_ORDER`` whose ``peak_estimate`` fits ``free_bytes``.

    On the CPU the models live in host memory whatever the profile: ``full``. A configured GGUF
    file is what the user wants to run: ``gguf``. When nothing fits, the smallest is tried anyway
    (the reason says so).
    """
    if device_type != "cuda" or free_bytes is None:
        return Choice(PROFILES["full"], "not a CUDA device: the models live in host memory, "
                                        "nothing to save on a device", peak_estimate(PROFILES["full"], sizes))
    if gguf_configured:
        profile = PROFILES["gguf"]
        return Choice(profile, f"gguf_file is set (estimated peak {_gb(peak_estimate(profile, sizes))} of "
                               f"{_gb(free_bytes)} free)", peak_estimate(profile, sizes))
    tried = []
    for name in AUTO_ORDER:
        profile = PROFILES[name]
        peak = peak_estimate(profile, sizes)
        if peak <= free_bytes:
            reason = f"estimated peak {_gb(peak)} fits {_gb(free_bytes)} free"
            if tried:
                reason += f" ({'; '.join(tried)})"
            host = host_bytes(profile, sizes)
            if host_free_bytes is not None and host > host_free_bytes:
                reason += (f"; the offloaded weights need {_gb(host)} of host memory and only "
                           f"{_gb(host_free_bytes)} is available")
            return Choice(profile, reason, peak)
        tried.append(f"{name} needs {_gb(peak)}")
    profile = PROFILES[AUTO_ORDER[-1]]
    peak = peak_estimate(profile, sizes)
    return Choice(profile, f"nothing fits {_gb(free_bytes)} free by the estimate ({'; '.join(tried)}); "
                           f"trying the smallest", peak)


def _gb(value: int) -> str:
    return f"{value / GiB:.1f} GiB"
