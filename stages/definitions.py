"""The five stages: what each reads, which models it needs, and its fingerprint.

A stage's fingerprint hashes everything its result depends on: the stage name, the job
parameters it reads, the identities of the models it uses, the engine and its version, and
the fingerprints of the checkpoints it reads. Equal fingerprints mean equal results, so a
checkpoint found under the fingerprint is reused: resume after a crash, a seed change that
reruns only ``sample`` and ``decode``, a seed sweep that encodes once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from config import StageParameters

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class JobInputs:
    """What a job gives the stages besides its parameters."""

    prompt: str
    negative_prompt: str
    seed: int
    images: tuple[tuple[str, str], ...]  # (label, sha256), image1 first


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # stages whose checkpoints it reads
    models: tuple[str, ...]  # model roles it needs loaded
    parameters: tuple[str, ...]  # StageParameters fields it reads
    job_values: Callable[[JobInputs, StageParameters], dict[str, Any]]  # other values it reads


def _prepare_values(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {"images": [list(image) for image in job.images]}


def _text_values(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "true_cfg": params.cfg > 1}


def _seed_value(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {"seed": job.seed}


def _nothing(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {}


STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), (), ("megapixels", "upscale_method"), _prepare_values),
    Stage("encode_latent", ("prepare",), ("vae",), ("width", "height", "denoise", "reference_mode"), _nothing),
    Stage("encode_text", ("prepare",), ("text_encoder", "vae"), ("reference_mode",), _text_values),
    Stage("sample", ("prepare", "encode_latent", "encode_text"), ("transformer",),
          ("width", "height", "shift", "cfg_norm_strength", "steps", "cfg", "sampler", "scheduler",
           "denoise", "lora", "lora_strength"), _seed_value),
    Stage("decode", ("sample",), ("vae",), (), _nothing),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def fingerprint(stage: Stage, job: JobInputs, params: StageParameters, engine_id: str,
                model_identities: Mapping[str, str], input_fingerprints: Mapping[str, str]) -> str:
    """The content address of ``stage``'s result for this job."""
    material = {
        "v": FINGERPRINT_VERSION,
        "stage": stage.name,
        "engine": engine_id,
        "parameters": {name: getattr(params, name) for name in stage.parameters},
        "values": stage.job_values(job, params),
        "models": {role: model_identities[role] for role in stage.models},
        "inputs": {name: input_fingerprints[name] for name in stage.reads},
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint_chain(job: JobInputs, params: StageParameters, engine_id: str,
                      model_identities: Mapping[str, str]) -> dict[str, str]:
    """Fingerprints of all five stages, computed before anything runs."""
    chain: dict[str, str] = {}
    for stage in STAGES:
        models = {role: model_identities[role] for role in stage.models}
        chain[stage.name] = fingerprint(stage, job, params, engine_id, models, chain)
    return chain


@dataclass(frozen=True)
class StageContext:
    """Everything a stage computation needs besides its input checkpoints."""

    job: JobInputs
    params: StageParameters
    image_paths: tuple[tuple[str, Any], ...]  # (label, Path), image1 first
    max_image_pixels: int


def compute(name: str, engine: Any, inputs: Mapping[str, Any], ctx: StageContext,
            resume: Any = None, on_step: Any = None, should_stop: Any = None) -> Any:
    """Run one stage's operation on ``engine``; ``inputs`` are the payloads of ``reads``."""
    # Imported here so that reading stage definitions needs neither Pillow nor torch.
    from stages.prepare import prepare

    if name == "prepare":
        return prepare(ctx.image_paths, ctx.params, ctx.max_image_pixels)
    if name == "encode_latent":
        return engine.encode_latent(inputs["prepare"], ctx.params)
    if name == "encode_text":
        return engine.encode_text(inputs["prepare"], ctx.params, ctx.job.prompt, ctx.job.negative_prompt)
    if name == "sample":
        return engine.sample(inputs["prepare"], inputs["encode_latent"], inputs["encode_text"], ctx.params,
                             ctx.job.seed, resume, on_step, should_stop)
    if name == "decode":
        decoded = engine.decode(inputs["sample"], ctx.params)
        return {**decoded, "image": to_8bit(decoded["image"])}
    raise KeyError(f"unknown stage {name!r}")


def to_8bit(image: Any) -> Any:
    """The 8-bit pixels of a float [H, W, 3] 0..1 image (an 8-bit one is returned as it is).

    ``decode``'s checkpoint holds these, the pixels every output format is encoded from: a
    quarter of the float image's bytes to write, hash and read back, and the same output.
    """
    import torch

    if image.dtype == torch.uint8:
        return image
    return (image.detach().to(torch.float32).cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
