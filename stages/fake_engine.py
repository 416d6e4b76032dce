"""The fake engine: the Engine protocol in NumPy, deterministic, in milliseconds, without torch.

It stands in for a real engine where what is tested is the daemon around it (ingest,
scheduling, checkpoints, resume, publishing, reliability) and in benchmarks that need an engine
of a known speed. It is selected with ``engine = "fake"``; the real engines keep their own tests.

What it computes is an identity-like edit: ``encode_latent`` maps image1 to -1..1 floats,
``sample`` starts from seeded noise and moves towards that latent over its steps (each step
depends only on the previous latent, so a run resumed from any step's state gives the same
bits), ``decode`` maps back to 8-bit pixels. A job's output is therefore its prepared image1,
which the photo-output tests use to check colour and orientation through the whole path.

Its models are NumPy buffers of a configurable size, loaded through the model cache like real
ones (so budgets, evictions and load counts behave), and ``fake.unit_seconds`` makes every stage
take that long (sampling spreads it over its steps), like a GPU busy while the CPU is free.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Optional, Sequence

import numpy as np

from config import Settings, StageParameters
from stages.engine import Check, Payload, SampleResume, StageInterrupted, StepCallback, engine_operation
from stages.errors import ModelNotFoundError, PermanentError
from stages.model_cache import ModelCache
from stages.resize import eight_bit

VERSION = "fake 1"
ROLES = ("vae", "text_encoder", "transformer")
STAGE_MODELS = {"prepare": (), "encode_latent": ("vae",), "encode_text": ("text_encoder", "vae"),
                "sample": ("transformer",), "decode": ("vae",)}


class FakeModel:
    """A loaded fake model: a buffer of the configured size."""

    def __init__(self, role: str, size: int):
        self.role = role
        self.weights = np.zeros(max(size, 1), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.weights.nbytes)


class FakeEngine:
    name = "fake"

    def __init__(self, settings: Settings, cache: ModelCache):
        self.settings = settings
        self.cache = cache
        self.options = settings.fake

    # Identity ------------------------------------------------------------------------------------

    def version(self) -> str:
        return VERSION

    def output_metadata(self, prompt: str, negative_prompt: str, seed: int, images: Sequence[str],
                        params: StageParameters) -> dict[str, str]:
        return {}

    def device_name(self) -> str:
        return f"cpu ({self.settings.effective_threads} threads) fake"

    def model_identities(self, params: StageParameters) -> dict[str, str]:
        identities = {role: f"fake {role} bytes={self.options.model_bytes(role)}" for role in ROLES}
        if params.lora:
            if self.options.available_loras is not None and params.lora not in self.options.available_loras:
                raise ModelNotFoundError(f"LoRA file not found: {params.lora}")
            identities["transformer"] += f"; lora {params.lora} strength={float(params.lora_strength)!r}"
        return identities

    def stage_models(self, stage: str, params: StageParameters) -> tuple[str, ...]:
        return STAGE_MODELS[stage]

    def load_models(self, stage: str, params: StageParameters) -> None:
        for role in STAGE_MODELS[stage]:
            self._model(role)

    def model_bytes(self, params: StageParameters) -> dict[str, int]:
        return {role: self.options.model_bytes(role) for role in ROLES}

    @classmethod
    def max_aspect_ratio(cls, settings: Settings) -> tuple[float, str]:
        return float("inf"), "the fake engine takes any shape"

    @classmethod
    def diagnose(cls, settings: Settings) -> list[Check]:
        return [Check("engine", True, "the fake engine (tests and benchmarks): no model, outputs are the inputs")]

    # Models --------------------------------------------------------------------------------------

    def _model(self, role: str) -> FakeModel:
        size = self.options.model_bytes(role)
        return self.cache.get(("fake", role, size), lambda: FakeModel(role, size), role)

    def _busy(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    # Stages --------------------------------------------------------------------------------------

    @engine_operation
    def encode_latent(self, prepared: Payload, params: StageParameters) -> Payload:
        self._model("vae")
        image = output_image(prepared, params)
        self._busy(self.options.unit_seconds)
        return {"latent": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}

    @engine_operation
    def encode_text(self, prepared: Payload, params: StageParameters, prompt: str,
                    negative_prompt: str) -> Payload:
        self._model("text_encoder")
        self._model("vae")
        self._busy(self.options.unit_seconds)
        return {"positive": _embedding(prompt), "negative": _embedding(negative_prompt) if params.cfg > 1 else None,
                "references": len(prepared["images"])}

    @engine_operation
    def sample(self, prepared: Payload, latent: Payload, text: Payload, params: StageParameters,
               seed: int, resume: Optional[SampleResume], on_step: Optional[StepCallback],
               should_stop: Optional[Callable[[], bool]] = None) -> Payload:
        self._model("transformer")
        target = np.asarray(latent["latent"], dtype=np.float32)
        steps = int(params.steps)
        if resume is not None:
            if not 0 <= resume.step <= steps:
                raise PermanentError(f"cannot resume sampling after step {resume.step} of {steps}")
            start, x = resume.step, np.array(resume.state["x"], dtype=np.float32)
        else:
            start = 0
            x = np.random.default_rng(seed).standard_normal(target.shape, dtype=np.float32)
        seconds = self.options.sample_seconds if self.options.sample_seconds is not None else self.options.unit_seconds
        per_step = seconds / steps
        for i in range(start, steps):
            if should_stop is not None and should_stop():
                raise StageInterrupted(f"sampling stopped after step {i} of {steps}")
            self._busy(per_step)
            x = (x + (target - x) * np.float32(1.0 / (steps - i))).astype(np.float32)
            if on_step is not None:
                on_step(i + 1, {"x": x})
        return {"x": x}

    @engine_operation
    def decode(self, sampled: Payload, params: StageParameters) -> Payload:
        self._model("vae")
        self._busy(self.options.unit_seconds)
        unit = (np.asarray(sampled["x"], dtype=np.float32) + np.float32(1.0)) * np.float32(0.5)
        decoded = {"image": np.clip(np.rint(unit * np.float32(255.0)), 0, 255).astype(np.uint8)}
        if params.bit_depth != 8:
            decoded["image16"] = sixteen_bits(unit)
        return decoded


def output_image(prepared: Payload, params: StageParameters) -> np.ndarray:
    """image1 as uint8 [H, W, 3], resized (nearest) to the job's width and height when given."""
    images = prepared["images"]
    if not images:
        raise PermanentError("no input image")
    image = eight_bit(images[0])
    if params.width is not None and params.height is not None:
        rows = (np.arange(params.height) * image.shape[0] // params.height).clip(0, image.shape[0] - 1)
        cols = (np.arange(params.width) * image.shape[1] // params.width).clip(0, image.shape[1] - 1)
        image = image[rows][:, cols]
    return image


def sixteen_bits(unit: np.ndarray) -> np.ndarray:
    """Pixels in 0..1 as uint16 (rounded)."""
    return np.clip(np.rint(np.asarray(unit, dtype=np.float64) * 65535.0), 0, 65535).astype(np.uint16)


def _embedding(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return np.frombuffer(digest, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
