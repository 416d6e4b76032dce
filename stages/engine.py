"""The contract between the stage runner and the libraries that compute.

An engine offers model loading and the model operations of the pipeline. It does not know
about checkpoints, fingerprints or the database: the runner (``stages/runner.py``) wraps every
call. Inputs and outputs are *payloads* (nested dicts/lists of tensors, numbers, strings, None)
that ``stages/checkpoint.py`` can store exactly.

Payload shapes every engine agrees on:

- ``prepare`` output: ``{"images": [uint8 Tensor[H, W, 3], ...]}`` - image1 already scaled to the
  job's megapixels, image2/image3 as loaded. Produced by ``stages.prepare`` for every engine.
- ``decode`` output: ``{"image": float32 Tensor[H, W, 3]}`` in 0..1.

What ``encode_latent``, ``encode_text`` and ``sample`` produce is the engine's own business
(a ComfyUI CONDITIONING is not a diffusers ``prompt_embeds``); the engine's name and version
are part of every fingerprint, so checkpoints of one engine are never fed to another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from config import Settings, StageParameters
from stages.model_cache import ModelCache

Payload = Any
StepCallback = Callable[[int, Payload], None]


@dataclass(frozen=True)
class SampleResume:
    """Where an interrupted ``sample`` continues: after ``step`` steps, from ``state``."""

    step: int
    state: Payload


class Engine(Protocol):
    name: str

    def version(self) -> str:
        """Engine library version (e.g. ``diffusers 0.42.1``); part of every fingerprint."""

    def model_identities(self, params: StageParameters) -> dict[str, str]:
        """Identity of each model role a job with ``params`` uses.

        Roles: ``vae``, ``text_encoder``, ``transformer`` (the diffusion model, with its LoRA
        name and strength folded in). An identity is a string that changes when the model's
        files change (name, size, mtime or a hash). Raises ModelNotFoundError naming the path
        for a missing model file.
        """

    def device_name(self) -> str:
        """Where the engine computes, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""

    def encode_latent(self, prepared: Payload, params: StageParameters) -> Payload:
        """Stage ``encode_latent``: VAE encodings the sampler starts from / refers to."""

    def encode_text(self, prepared: Payload, params: StageParameters, prompt: str,
                    negative_prompt: str) -> Payload:
        """Stage ``encode_text``: positive and negative conditioning with reference images."""

    def sample(self, prepared: Payload, latent: Payload, text: Payload, params: StageParameters,
               seed: int, resume: Optional[SampleResume], on_step: Optional[StepCallback],
               should_stop: Optional[Callable[[], bool]] = None) -> Payload:
        """Stage ``sample``: the denoised latent.

        ``on_step(k, state)`` is called after step k (1-based) with a payload from which
        ``SampleResume(k, state)`` continues so that the final result is bit-identical to an
        uninterrupted run. ``should_stop()`` True between steps raises StageInterrupted.
        """

    def decode(self, sampled: Payload, params: StageParameters) -> Payload:
        """Stage ``decode``: ``{"image": float32 Tensor[H, W, 3]}`` in 0..1."""


class StageInterrupted(Exception):
    """A stage stopped at a step boundary because the daemon is shutting down."""


def create_engine(settings: Settings, cache: ModelCache) -> Engine:
    """The engine the settings name, importing its library only now."""
    if settings.engine == "diffusers":
        from stages.diffusers_engine import DiffusersEngine
        return DiffusersEngine(settings, cache)
    if settings.engine == "comfyui":
        from stages.comfyui_engine import ComfyUIEngine
        return ComfyUIEngine(settings, cache)
    raise ValueError(f"unknown engine {settings.engine!r}")
