"""The stages, each declared once: what it reads, which models it needs, which job values shape
its result, whether it runs in steps, whether its result is published, and how it computes.

The runner, the scheduler and the fingerprints read these declarations and nothing else about
a stage, so adding a stage means adding its ``Stage(...)`` here and its operation to each
engine (docs/architecture.md walks through an example).

A stage's fingerprint hashes everything its result depends on: the stage name (and version),
the job parameters it reads, the identities of the models it uses, the engine and its version,
and the fingerprints of the checkpoints it reads. Equal fingerprints mean equal results, so a
checkpoint found under the fingerprint is reused: resume after a crash, a seed change that
reruns only ``sample`` and ``decode``, a seed sweep that encodes once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from config import StageParameters

if TYPE_CHECKING:
    from stages.engine import Engine, SampleResume, StepCallback

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class JobInputs:
    """What a job gives the stages besides its parameters."""

    prompt: str
    negative_prompt: str
    seed: int
    images: tuple[tuple[str, str], ...]  # (label, sha256), image1 first


@dataclass(frozen=True)
class StageCall:
    """Everything one computation of a stage gets."""

    engine: "Engine"
    inputs: Mapping[str, Any]  # the payloads of the stages it reads
    job: JobInputs
    params: StageParameters
    image_paths: tuple[tuple[str, Path], ...]  # (label, path), image1 first
    max_image_pixels: int
    resume: Optional["SampleResume"] = None
    on_step: Optional["StepCallback"] = None
    should_stop: Optional[Callable[[], bool]] = None


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # stages whose checkpoints it reads
    models: tuple[str, ...]  # model roles its result depends on
    parameters: tuple[str, ...]  # StageParameters fields it reads
    job_values: Callable[[JobInputs, StageParameters], dict[str, Any]]  # other values it reads
    compute: Callable[[StageCall], Any]
    steps: Optional[Callable[[StageParameters], int]] = None  # stepped: progress, partials, resume
    final: bool = False  # its result is the published image
    version: int = 1  # raised when the stage's result changes for the same inputs

    @property
    def stepped(self) -> bool:
        return self.steps is not None

    def steps_for(self, params: StageParameters) -> Optional[int]:
        return self.steps(params) if self.steps is not None else None


def _prepare_values(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    from stages.resize import fingerprint_values
    return {"images": [list(image) for image in job.images],
            **fingerprint_values(params.upscale_method, params.megapixels)}


def _text_values(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    values = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "true_cfg": params.cfg > 1}
    # Engines differ in when the negative is encoded: diffusers for cfg > 1 (true CFG), ComfyUI
    # unless cfg is (math.isclose) 1. Where the two rules disagree the result is told apart too;
    # elsewhere (cfg 1, cfg > 1) the values, and so the fingerprints, stay as they were.
    near_1 = math.isclose(params.cfg, 1.0)
    if near_1 == (params.cfg > 1):
        values["cfg_near_1"] = near_1
    return values


def _seed_value(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {"seed": job.seed}


def _nothing(job: JobInputs, params: StageParameters) -> dict[str, Any]:
    return {}


def _prepare(call: StageCall) -> Any:
    from stages.prepare import prepare  # Pillow only when a stage really runs
    return prepare(call.image_paths, call.params, call.max_image_pixels)


def _encode_latent(call: StageCall) -> Any:
    return call.engine.encode_latent(call.inputs["prepare"], call.params)


def _encode_text(call: StageCall) -> Any:
    return call.engine.encode_text(call.inputs["prepare"], call.params, call.job.prompt, call.job.negative_prompt)


def _sample(call: StageCall) -> Any:
    return call.engine.sample(call.inputs["prepare"], call.inputs["encode_latent"], call.inputs["encode_text"],
                              call.params, call.job.seed, call.resume, call.on_step, call.should_stop)


def _decode(call: StageCall) -> Any:
    return call.engine.decode(call.inputs["sample"], call.params)


# In the order a job runs them when nothing else decides: encode_text before encode_latent, so
# that the VAE is the most recently used model when the diffusion model is loaded (a budget
# that holds the diffusion model and the VAE evicts the text encoder and keeps the VAE).
STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), (), ("megapixels", "upscale_method"), _prepare_values, _prepare),
    Stage("encode_text", ("prepare",), ("text_encoder", "vae"), ("reference_mode",), _text_values, _encode_text),
    Stage("encode_latent", ("prepare",), ("vae",), ("width", "height", "denoise", "reference_mode"), _nothing,
          _encode_latent),
    Stage("sample", ("prepare", "encode_latent", "encode_text"), ("transformer",),
          ("width", "height", "shift", "cfg_norm_strength", "steps", "cfg", "sampler", "scheduler",
           "denoise", "lora", "lora_strength"), _seed_value, _sample, steps=lambda params: params.steps),
    # Version 2: the engine's own 8-bit conversion (ComfyUI's SaveImage truncates, diffusers rounds).
    # bit_depth: 16-bit pixels are handed over beside the 8-bit ones ("image16").
    Stage("decode", ("sample",), ("vae",), ("bit_depth",), _nothing, _decode, final=True, version=2),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}
FINAL_STAGE = next(stage.name for stage in STAGES if stage.final)


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
    if stage.version != 1:
        material["stage_version"] = stage.version
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint_chain(job: JobInputs, params: StageParameters, engine_id: str,
                      model_identities: Mapping[str, str]) -> dict[str, str]:
    """Fingerprints of every stage, computed before anything runs."""
    chain: dict[str, str] = {}
    for stage in STAGES:
        chain[stage.name] = fingerprint(stage, job, params, engine_id, model_identities, chain)
    return chain


def needed_stages(chain: Mapping[str, str], recorded: set[str] | frozenset[str]) -> list[str]:
    """The stages a job still has to compute to reach its final result, given the fingerprints
    that have a checkpoint: walking back from the final stage, every stage without one."""
    needed: list[str] = []
    pending = [FINAL_STAGE]
    while pending:
        name = pending.pop()
        if name in needed or chain[name] in recorded:
            continue
        needed.append(name)
        pending.extend(BY_NAME[name].reads)
    return [name for name in STAGE_NAMES if name in needed]


def runnable_stages(chain: Mapping[str, str], recorded: set[str] | frozenset[str]) -> list[str]:
    """The needed stages whose inputs all have a checkpoint: what can run now."""
    return [name for name in needed_stages(chain, recorded)
            if all(chain[read] in recorded for read in BY_NAME[name].reads)]
