"""The contract between the stage runner and the libraries that compute, and the registry of
engines by name.

An engine offers model loading and the model operations of the pipeline. It does not know
about checkpoints, fingerprints or the database: the runner wraps every call. Inputs and
outputs are *payloads* (nested dicts/lists of arrays, numbers, strings, None) that
``stages/checkpoint.py`` stores exactly.

Payload shapes every engine agrees on:

- ``prepare`` output: ``{"images": [uint8 ndarray[H, W, 3], ...]}``: image1 already scaled to the
  job's megapixels, image2/image3 as loaded. Made by ``stages.prepare`` for every engine. Scaled
  with a float method (bicubic, bilinear, area), image1 is ``float32`` in 0..1 instead: ComfyUI's
  own values (``stages/resize.py``); an engine that needs 8 bits takes ``resize.eight_bit``.
- ``decode`` output: ``{"image": uint8 ndarray[H, W, 3]}``: exactly the pixels the engine's own
  library would save, so each engine publishes its library's pixels; with ``bit_depth`` other
  than 8 also ``"image16": uint16 ndarray[H, W, 3]``, the decoder's float output rounded to 16 bits.

What ``encode_latent``, ``encode_text`` and ``sample`` produce is the engine's own business
(a ComfyUI CONDITIONING is not a diffusers ``prompt_embeds``); the engine's name and version
are part of every fingerprint, so checkpoints of one engine are never fed to another.

Errors leave an engine as the stage error tree says (``stages/errors.py``): running out of
device or host memory is a ``RetryableError`` (``@engine_operation`` translates it at the
engine's edge), a missing model a ``ModelNotFoundError``.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, TypeVar

from config import Settings, StageParameters
from stages.errors import RetryableError

if TYPE_CHECKING:
    from stages.model_cache import ModelCache

Payload = Any
StepCallback = Callable[[int, Payload], None]

# The engines by name: module and class, imported only when chosen (so choosing the fake engine
# imports no torch, and no engine module imports another).
ENGINES: dict[str, str] = {
    "diffusers": "stages.diffusers_engine:DiffusersEngine",
    "comfyui": "stages.comfyui_engine:ComfyUIEngine",
    "fake": "stages.fake_engine:FakeEngine",
}


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: what was checked, whether it is fine, the details."""

    check: str
    ok: bool
    detail: str
    data: Optional[dict[str, Any]] = None  # structured details (``doctor --json``)


@dataclass(frozen=True)
class SampleResume:
    """Where an interrupted ``sample`` continues: after ``step`` steps, from ``state``."""

    step: int
    state: Payload


class StageInterrupted(Exception):
    """A stage stopped at a step boundary because the daemon is stopping or the job was cancelled."""


class Engine(Protocol):
    name: str
    cache: "ModelCache"  # every model the engine loads goes through it

    def version(self) -> str:
        """Engine library version (e.g. ``diffusers 0.42.1``); part of every fingerprint."""

    def model_identities(self, params: StageParameters) -> dict[str, str]:
        """Identity of each model role a job with ``params`` uses.

        Roles: ``vae``, ``text_encoder``, ``transformer`` (the diffusion model, with its LoRA
        name and strength folded in). An identity is a string that changes when the model's
        files change (name, size, mtime or a hash). Raises ModelNotFoundError naming the path
        for a missing model file.
        """

    def stage_models(self, stage: str, params: StageParameters) -> tuple[str, ...]:
        """The model roles this engine loads to compute ``stage`` for a job with ``params``
        (it may need fewer than the stage's fingerprint names, e.g. no VAE at cfg 1)."""

    def load_models(self, stage: str, params: StageParameters) -> None:
        """Load (through the cache) the models ``stage`` needs for a job with ``params``; called
        ahead of the stage inside ``cache.prefetching()`` when they fit beside the loaded ones."""

    def output_metadata(self, prompt: str, negative_prompt: str, seed: int, images: Sequence[str],
                        params: StageParameters) -> dict[str, str]:
        """Text the published image carries for this engine (PNG text chunks; the manifest holds
        them too), e.g. ComfyUI's ``prompt`` and ``workflow`` for the job as run; ``images`` are
        the job's image file names, image1 first. Empty when the engine has none."""

    def model_bytes(self, params: StageParameters) -> dict[str, int]:
        """Estimates of the bytes each role's model holds once loaded, before it is (the
        scheduler decides from them whether the queued work's models fit the budget together)."""

    def device_name(self) -> str:
        """Where the engine computes, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""

    @classmethod
    def max_aspect_ratio(cls, settings: Settings) -> tuple[float, str]:
        """The most elongated image (long side / short side) the engine's pipeline takes, and
        why; ingest refuses longer ones naming this limit. Never loads a model."""

    @classmethod
    def diagnose(cls, settings: Settings) -> list[Check]:
        """What ``doctor`` shows for this engine (library importable, model files found...),
        without loading a model; never raises."""

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
        """Stage ``decode``: ``{"image": uint8 ndarray[H, W, 3]}``, the library's own pixels (and
        ``"image16"``, uint16, when ``params.bit_depth`` is not 8)."""


def engine_class(name: str) -> type:
    """The class of the engine called ``name``, importing its module (and library) only now."""
    try:
        module_name, class_name = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; the engines are {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(settings: Settings, cache: "ModelCache") -> Engine:
    """The engine the settings name."""
    return engine_class(settings.engine)(settings, cache)


F = TypeVar("F", bound=Callable[..., Any])


def engine_operation(method: F) -> F:
    """Translate running out of memory inside an engine operation into a RetryableError (the
    job is retried later, when another job's models may be gone), keeping the cause."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except MemoryError as exc:
            raise RetryableError(f"{method.__name__}: out of host memory") from exc
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if is_out_of_memory(exc):
                _release_device_memory()
                raise RetryableError(f"{method.__name__}: out of device memory ({_first_line(exc)})") from exc
            raise

    return wrapper  # type: ignore[return-value]


def is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "outofmemoryerror" in text or "out of memory" in text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _release_device_memory() -> None:
    import gc
    import sys
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
