"""The diffusers engine: Qwen-Image-Edit-2509 through diffusers' Qwen-Image-Edit-Plus components.

The four model operations of ``QwenImageEditPlusPipeline.__call__``, split at its seams so that
each stage's result is a checkpointable payload, and so that running the stages one after the
other (in one process or several, with checkpoints in between) gives the same bits as the
one-shot pipeline call on the same inputs:

- ``encode_latent``: each image resized to ``vae_image_area`` (the pipeline's
  ``calculate_dimensions`` + ``image_processor.preprocess``), VAE-encoded (argmax), normalised
  with ``latents_mean``/``latents_std`` and packed 2x2, as ``prepare_latents`` does.
- ``encode_text``: each image resized to ``condition_image_area`` for the vision tower;
  ``encode_prompt`` for the prompt and, with true CFG, the negative prompt.
- ``sample``: the pipeline's noise (``randn_tensor`` from a CPU generator seeded with the job's
  seed), its sigmas and its denoising loop, with ComfyUI's ModelSamplingAuraFlow shift, CFGNorm
  strength and KSampler denoise on top; resumable after any step.
- ``decode``: unpack, de-normalise, ``vae.decode``, ``(x / 2 + 0.5).clamp(0, 1)``.

Payload layouts (all tensors in the compute dtype on the compute device until checkpointed):

- encode_latent: ``{"image_latents": T[1, sum(L_i), 64], "image_shapes": [[1, h_i, w_i], ...],
  "vae_sizes": [[width, height], ...], "height": H, "width": W, "init_latents": T[1, L, 64] | None}``
  (``h_i, w_i`` in 2x2 latent patches; ``init_latents`` only when denoise < 1).
- encode_text: ``{"prompt_embeds": T[1, L, D], "prompt_embeds_mask": T[1, L] | None,
  "negative_prompt_embeds": T | None, "negative_prompt_embeds_mask": T | None}``.
- sample: ``{"latents": T[1, L, 64], "height": H, "width": W}``; per-step state
  ``{"latents": T[1, L, 64]}``.
- decode: ``{"image": float32 T[H, W, 3]}`` in 0..1 on the CPU.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from config import ReferenceMode, Settings, StageParameters
from stages.engine import Check, Payload, SampleResume, StageInterrupted, StepCallback, engine_operation
from stages.errors import ModelNotFoundError, PermanentError
from stages.memory_profiles import GiB, PROFILES, Choice, MemoryProfile, ModelSizes, Storage, choose_profile, device_bytes
from stages.model_cache import ModelCache
from stages.placement import (TEXT_ENCODER_BLOCK_MODULES, TORCHAO_CONFIGS, device_footprint, place,
                              quantize_torchao, set_footprint, store_fp8)
from stages.resize import eight_bit

log = logging.getLogger(__name__)

ENGINE_HINTS_FILE = "qie_engine.json"
DEFAULT_VAE_IMAGE_AREA = 1024 * 1024
DEFAULT_CONDITION_IMAGE_AREA = 384 * 384
DEFAULT_VAE_TILE = (256, 192)  # diffusers' AutoencoderKLQwenImage tile size and stride, pixels
SAMPLERS = ("euler",)
SCHEDULERS = ("simple", "normal")
ADAPTER_NAME = "qie_lora"

# The model roles each stage loads (encode_text needs no VAE here: the vision tower sees the images).
STAGE_MODELS = {"prepare": (), "encode_latent": ("vae",), "encode_text": ("text_encoder",),
                "sample": ("transformer",), "decode": ("vae",)}

# Files whose content defines each model role, relative to the model folder.
ROLE_FOLDERS = {
    "vae": ("vae",),
    "text_encoder": ("text_encoder", "tokenizer", "processor"),
    "transformer": ("transformer", "scheduler"),
}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PermanentError(f"device {setting!r} is configured but CUDA is not available")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def files_identity(label: str, paths: list[Path]) -> str:
    """``label`` + total size + newest mtime of every file under ``paths``."""
    size = 0
    newest = 0
    count = 0
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()
            size += stat.st_size
            newest = max(newest, stat.st_mtime_ns)
            count += 1
    return f"{label} files={count} bytes={size} mtime_ns={newest}"


class _TextEncoderBundle:
    """The text encoder with its tokenizer and processor: one cache entry, sized by the model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, processor: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor

    def parameters(self):
        return self.model.parameters()

    def buffers(self):
        return self.model.buffers()


def import_libraries() -> None:
    """Import every library module the engine uses, in the thread that makes the engine, before
    any other thread does. diffusers, transformers and peft import lazily, and two threads
    importing the same half-initialised modules at once (a model loading ahead while a stage
    runs) can each get the other's partial module: "cannot import name ... from partially
    initialized module", and a process whose every later job fails."""
    import peft.tuners.lora.layer  # noqa: F401 - the LoRA layers diffusers' loaders import
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,  # noqa: F401
                           QwenImageEditPlusPipeline, QwenImageTransformer2DModel)
    from diffusers.hooks import apply_group_offloading, apply_layerwise_casting  # noqa: F401
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN  # noqa: F401
    from diffusers.loaders import lora_pipeline  # noqa: F401
    from diffusers.models.model_loading_utils import load_gguf_checkpoint  # noqa: F401
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions  # noqa: F401
    from diffusers.utils.torch_utils import randn_tensor  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor  # noqa: F401


class DiffusersEngine:
    """The Engine protocol (stages/engine.py) on diffusers' QwenImageEditPlus components."""

    name = "diffusers"

    def __init__(self, settings: Settings, cache: ModelCache):
        self.settings = settings
        self.cache = cache
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self._choice: Optional[Choice] = None
        self._sizes: Optional[ModelSizes] = None
        # Results differ in the last bits between thread counts: fix it (DESIGN section 3).
        torch.set_num_threads(settings.effective_threads)
        import_libraries()

    # Identity ----------------------------------------------------------------------------------

    def version(self) -> str:
        import diffusers
        import transformers
        return (f"diffusers {diffusers.__version__}; transformers {transformers.__version__}; "
                f"torch {torch.__version__}")

    def output_metadata(self, prompt: str, negative_prompt: str, seed: int, images: Sequence[str],
                        params: StageParameters) -> dict[str, str]:
        return {}  # a diffusers run has no graph to embed

    def device_name(self) -> str:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index} ({torch.cuda.get_device_name(index)}) {self._dtype_name()}"
        return f"cpu ({torch.get_num_threads()} threads) {self._dtype_name()}"

    def _dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def model_identities(self, params: StageParameters) -> dict[str, str]:
        root = self.model_root()
        hints = root / ENGINE_HINTS_FILE
        extra = [hints] if hints.is_file() else []
        profile = self.memory_profile()
        identities = {}
        for role, folders in ROLE_FOLDERS.items():
            paths = [self._component(folder) for folder in folders]
            if role != "transformer":
                paths += extra  # the image areas shape the vae and text encoder stages
            elif profile.transformer is Storage.GGUF:  # the weights are the GGUF file's
                paths = [self._component("transformer") / "config.json", self._component("scheduler")]
            identities[role] = files_identity(f"{root.name}/{'+'.join(folders)}", paths)
            # A profile that changes the numbers is part of the identity; offloading is not.
            identities[role] += self._storage_identity(role, profile)
        lora = self._lora_path(params)
        if lora is not None:
            identities["transformer"] += (f"; lora {files_identity(lora.name, [lora])}"
                                          f" strength={float(params.lora_strength)!r}")
        else:
            identities["transformer"] += "; lora none"
        identities = {role: f"{value}; dtype={self._dtype_name()}" for role, value in identities.items()}
        return identities

    def stage_models(self, stage: str, params: StageParameters) -> tuple[str, ...]:
        return STAGE_MODELS[stage]

    def load_models(self, stage: str, params: StageParameters) -> None:
        loaders = {"vae": self._vae, "text_encoder": self._text_encoder, "transformer": self._transformer}
        for role in STAGE_MODELS[stage]:
            loaders[role](params)

    def model_bytes(self, params: StageParameters) -> dict[str, int]:
        """Estimates of what each role holds on the device once loaded under the memory profile:
        its weight files scaled to the stored dtype, an offloaded model's window."""
        profile = self.memory_profile()
        sizes = self.model_sizes()
        return {role: device_bytes(profile, role, sizes) for role in ROLE_FOLDERS}

    def model_sizes(self) -> ModelSizes:
        if self._sizes is None:
            self._sizes = model_sizes(self.settings, self.model_root(), self.dtype)
        return self._sizes

    # Memory profile ----------------------------------------------------------------------------

    def memory_profile(self) -> MemoryProfile:
        return self.profile_choice().profile

    def profile_choice(self) -> Choice:
        """The memory profile in force, chosen once, before any model is loaded (``auto`` looks
        at the free device memory then)."""
        if self._choice is None:
            self._choice = profile_choice(self.settings, self.device, self.model_sizes())
            log.info("memory profile %s: %s", self._choice.profile.name, self._choice.reason)
        return self._choice

    def _storage_identity(self, role: str, profile: MemoryProfile) -> str:
        """What the profile does to ``role``'s numbers, for its identity ('' when nothing)."""
        if role == "vae":
            if not profile.tiles(self.settings.vae_tiling):
                return ""
            hints = self.hints()
            return f"; vae_tiling={hints['vae_tile_size']}/{hints['vae_tile_stride']}"
        storage = profile.storage(role)
        if storage is Storage.FP8:
            return "; storage=float8_e4m3fn"
        if storage is Storage.TORCHAO:
            return f"; storage=torchao {self.settings.torchao_quantization} {_version('torchao')}"
        if storage is Storage.GGUF:
            path = self._gguf_file()
            return f"; storage=gguf {files_identity(path.name, [path])} {_version('gguf')}"
        return ""

    def _gguf_file(self) -> Path:
        path = self.settings.gguf_file
        if path is None:
            raise PermanentError("memory_profile 'gguf' needs gguf_file (QIE_GGUF_FILE)")
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return path

    def _arrange(self, role: str, model: torch.nn.Module, block_modules: tuple[str, ...] = ()) -> int:
        """Store and place a loaded model as the profile says; the bytes it then holds on the device."""
        profile = self.memory_profile()
        storage = profile.storage(role)
        offload = role in profile.offloaded
        if storage is Storage.FP8:
            store_fp8(model, self.dtype)
        elif storage is Storage.TORCHAO:
            quantize_torchao(model, self.settings.torchao_quantization, None if offload else self.device)
        place(model, self.device, offload, block_modules)
        return device_footprint(model, offload, block_modules)

    @classmethod
    def diagnose(cls, settings: Settings) -> list[Check]:
        checks = []
        try:
            import diffusers
            checks.append(Check("diffusers", True, f"diffusers {diffusers.__version__}"))
        except ImportError as exc:
            checks.append(Check("diffusers", False, f"not importable: {exc} (pip install 'qie-hotfolder[diffusers]')"))
        path = settings.effective_model_path
        checks += _profile_checks(settings, path)
        if settings.model_path is None:
            checks.append(Check("model", True, f"built-in tiny random model at {path} (outputs are noise; built on "
                                               "first use)"))
            return checks
        for part in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
            checks.append(Check(f"model {part}", (path / part).exists(), str(path / part)))
        lora = settings.defaults.lora
        if lora:
            lora_path = settings.effective_lora_dir / lora
            checks.append(Check("default LoRA", lora_path.is_file(), str(lora_path)))
        return checks

    # Model files -------------------------------------------------------------------------------

    def model_root(self) -> Path:
        """The model folder; the built-in tiny model is built on first use when none is configured."""
        root = self.settings.effective_model_path
        if self.settings.model_path is None and not (root / "model_index.json").is_file():
            from stages.tiny_model import build_tiny_model
            log.warning("no model_path configured: building the tiny random model at %s "
                        "(outputs are noise)", root)
            build_tiny_model(root)
        if not root.is_dir():
            raise ModelNotFoundError(f"model folder not found: {root}")
        return root

    def _component(self, folder: str) -> Path:
        path = self.model_root() / folder
        if not path.is_dir() or not any(path.iterdir()):
            raise ModelNotFoundError(f"model component '{folder}' not found: {path}")
        return path

    def _lora_path(self, params: StageParameters) -> Optional[Path]:
        if not params.lora:
            return None
        path = self.settings.effective_lora_dir / params.lora
        if not path.is_file():
            raise ModelNotFoundError(f"LoRA file not found: {path}")
        return path

    def hints(self) -> dict[str, int]:
        """Image areas for the VAE and the vision tower (``qie_engine.json`` in the model folder)."""
        return read_hints(self.model_root())

    @classmethod
    def max_aspect_ratio(cls, settings: Settings) -> tuple[float, str]:
        """The most elongated image the pipeline takes, and why: each image is resized to the
        VAE's and the vision tower's areas in multiples of 32 pixels (``calculate_dimensions``),
        and a short side under 16 pixels rounds to 0; Qwen2.5-VL's processor refuses more than 200:1."""
        root = settings.effective_model_path
        if settings.model_path is None and not (root / ENGINE_HINTS_FILE).is_file():
            from stages.tiny_model import ENGINE_HINTS
            hints = dict(ENGINE_HINTS)
        else:
            try:
                hints = read_hints(root)
            except PermanentError:
                return 200.0, "Qwen2.5-VL's image processor takes at most 200:1"
        area = min(hints["vae_image_area"], hints["condition_image_area"])
        limit = area / 256
        if limit < 200:
            return limit, (f"the model's smallest image area ({area} pixels) leaves a short side under "
                           f"16 pixels beyond {limit:g}:1")
        return 200.0, "Qwen2.5-VL's image processor takes at most 200:1"

    # Loading (every model goes through the cache) ------------------------------------------------

    def _key(self, role: str, params: StageParameters) -> tuple:
        return ("diffusers", role, self.model_identities(params)[role], str(self.device), str(self.dtype),
                self.memory_profile().name)

    def _get(self, role: str, params: StageParameters, load: Callable[[], Any]) -> Any:
        """``role``'s model from the cache, which makes room for it before loading."""
        return self.cache.get(self._key(role, params), load, role,
                              expected_bytes=self.model_bytes(params)[role])

    def _vae(self, params: StageParameters):
        path = self._component("vae")

        def load():
            from diffusers import AutoencoderKLQwenImage
            with _model_files(path):
                model = AutoencoderKLQwenImage.from_pretrained(path, torch_dtype=self.dtype,
                                                               local_files_only=True)
            model = model.to(self.device).eval()
            if self.memory_profile().tiles(self.settings.vae_tiling):
                hints = self.hints()
                size, stride = hints["vae_tile_size"], hints["vae_tile_stride"]
                model.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                                    tile_sample_stride_height=stride, tile_sample_stride_width=stride)
            return model

        return self._get("vae", params, load)

    def _text_encoder(self, params: StageParameters) -> _TextEncoderBundle:
        paths = {name: self._component(name) for name in ROLE_FOLDERS["text_encoder"]}

        def load():
            from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                                      Qwen2VLProcessor)
            with _model_files(paths["text_encoder"]):
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    paths["text_encoder"], dtype=self.dtype, local_files_only=True)
            with _model_files(paths["tokenizer"]):
                tokenizer = Qwen2Tokenizer.from_pretrained(paths["tokenizer"], local_files_only=True)
            with _model_files(paths["processor"]):
                processor = Qwen2VLProcessor.from_pretrained(paths["processor"], local_files_only=True)
            footprint = self._arrange("text_encoder", model.eval(), TEXT_ENCODER_BLOCK_MODULES)
            bundle = _TextEncoderBundle(model, tokenizer, processor)
            set_footprint(bundle, footprint)
            return bundle

        return self._get("text_encoder", params, load)

    def _transformer(self, params: StageParameters):
        path = self._component("transformer")
        lora = self._lora_path(params)
        strength = float(params.lora_strength)

        def load():
            model = self._load_transformer(path).eval()
            if lora is not None:  # fused in the compute dtype, before float8 storage or torchao
                apply_lora(model, lora, strength, self.dtype,
                           fuse=self.memory_profile().transformer is not Storage.GGUF)
            set_footprint(model, self._arrange("transformer", model))
            return model

        return self._get("transformer", params, load)

    def _load_transformer(self, path: Path) -> torch.nn.Module:
        """The diffusion model in host memory: from the model folder in the compute dtype, or
        from the GGUF file (quantized weights, dequantized to the compute dtype per layer)."""
        from diffusers import QwenImageTransformer2DModel
        if self.memory_profile().transformer is not Storage.GGUF:
            with _model_files(path):
                return QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=self.dtype,
                                                                   local_files_only=True)
        from diffusers import GGUFQuantizationConfig
        gguf = self._gguf_file()
        state = gguf_state_dict(gguf)
        try:
            return QwenImageTransformer2DModel.from_single_file(
                state, quantization_config=GGUFQuantizationConfig(compute_dtype=self.dtype),
                config=str(self.model_root()), subfolder="transformer", torch_dtype=self.dtype,
                local_files_only=True)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise PermanentError(f"GGUF file {gguf} does not fit the diffusion model in "
                                 f"{path} ({_first_line(exc)})") from exc

    def scheduler_config(self) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler
        path = self._component("scheduler")
        try:
            return dict(FlowMatchEulerDiscreteScheduler.load_config(path, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"scheduler config not readable in {path} ({exc})") from exc

    def _pipeline(self, vae=None, text_encoder: Optional[_TextEncoderBundle] = None):
        """A pipeline object around whatever components a stage needs, to reuse its methods."""
        from diffusers import QwenImageEditPlusPipeline
        return QwenImageEditPlusPipeline(
            scheduler=None, vae=vae, transformer=None,
            text_encoder=text_encoder.model if text_encoder else None,
            tokenizer=text_encoder.tokenizer if text_encoder else None,
            processor=text_encoder.processor if text_encoder else None)

    # Sizes -------------------------------------------------------------------------------------

    @staticmethod
    def _check_reference_mode(params: StageParameters) -> None:
        if params.reference_mode != ReferenceMode.SCALED.value:
            raise PermanentError(f"reference_mode {params.reference_mode!r} is not supported by the diffusers "
                                 f"engine (field 'reference_mode'; supported: scaled)")

    @staticmethod
    def _pil_images(prepared: Payload) -> list[Image.Image]:
        images = prepared["images"]
        if not images:
            raise PermanentError("no input image")
        return [Image.fromarray(eight_bit(image)) for image in images]

    @staticmethod
    def output_size(prepared: Payload, params: StageParameters, multiple: int = 16) -> tuple[int, int]:
        """(width, height) of the result: the job's width/height, else image1's, down to ``multiple``."""
        if params.width is not None and params.height is not None:
            width, height = params.width, params.height
        else:
            height, width = np.asarray(prepared["images"][0]).shape[:2]
        width, height = width // multiple * multiple, height // multiple * multiple
        if width < multiple or height < multiple:
            raise PermanentError(f"output size {width}x{height} is too small: image1 (or width/height) "
                                 f"must be at least {multiple}x{multiple} pixels")
        return int(width), int(height)

    # Stage encode_latent -------------------------------------------------------------------------

    @engine_operation
    def encode_latent(self, prepared: Payload, params: StageParameters) -> Payload:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        self._check_reference_mode(params)
        vae = self._vae(params)
        pipe = self._pipeline(vae=vae)
        scale = pipe.vae_scale_factor
        width, height = self.output_size(prepared, params, scale * 2)
        channels = pipe.latent_channels
        area = self.hints()["vae_image_area"]
        packed, shapes, sizes = [], [], []
        with torch.inference_mode():
            for image in self._pil_images(prepared):
                vae_width, vae_height = calculate_dimensions(area, image.width / image.height)
                pixels = pipe.image_processor.preprocess(image, vae_height, vae_width).unsqueeze(2)
                latents = self._encode(pipe, pixels)
                packed.append(pipe._pack_latents(latents, 1, channels, *latents.shape[3:]))
                shapes.append([1, vae_height // scale // 2, vae_width // scale // 2])
                sizes.append([int(vae_width), int(vae_height)])
            init_latents = None
            if params.denoise < 1:
                image1 = self._pil_images(prepared)[0]
                pixels = pipe.image_processor.preprocess(image1, height, width).unsqueeze(2)
                latents = self._encode(pipe, pixels)
                init_latents = pipe._pack_latents(latents, 1, channels, *latents.shape[3:])
            image_latents = torch.cat(packed, dim=1)
        return {"image_latents": image_latents, "image_shapes": shapes, "vae_sizes": sizes,
                "height": height, "width": width, "init_latents": init_latents}

    def _encode(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of a [1, 3, 1, H, W] image in -1..1 (the pipeline's prepare_latents)."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return pipe._encode_vae_image(image=pixels, generator=None)

    # Stage encode_text ---------------------------------------------------------------------------

    @engine_operation
    def encode_text(self, prepared: Payload, params: StageParameters, prompt: str,
                    negative_prompt: str) -> Payload:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        self._check_reference_mode(params)
        bundle = self._text_encoder(params)
        pipe = self._pipeline(text_encoder=bundle)
        area = self.hints()["condition_image_area"]
        condition_images = []
        for image in self._pil_images(prepared):
            cond_width, cond_height = calculate_dimensions(area, image.width / image.height)
            condition_images.append(pipe.image_processor.resize(image, cond_height, cond_width))
        with torch.inference_mode():
            embeds, mask = pipe.encode_prompt(image=condition_images, prompt=prompt, device=self.device)
            negative_embeds = negative_mask = None
            # True CFG as in the pipeline (and ComfyUI's KSampler): cfg > 1 with a negative
            # prompt, where an empty negative prompt is still a prompt (the pipeline's test is
            # ``negative_prompt is not None``; ComfyUI encodes the empty text).
            if params.cfg > 1:
                negative_embeds, negative_mask = pipe.encode_prompt(
                    image=condition_images, prompt=negative_prompt, device=self.device)
        # encode_prompt returns mask None when every token is valid (always at batch 1): kept as is.
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                "negative_prompt_embeds": negative_embeds, "negative_prompt_embeds_mask": negative_mask}

    # Stage sample --------------------------------------------------------------------------------

    def make_scheduler(self, params: StageParameters):
        """The Qwen-Image scheduler with a static shift.

        ComfyUI's workflow sets the shift with ModelSamplingAuraFlow (shift 3 in the template):
        sigma' = shift * sigma / (1 + (shift - 1) * sigma), the same for every resolution. That is
        diffusers' FlowMatchEulerDiscreteScheduler with ``use_dynamic_shifting=False`` and
        ``shift=params.shift``; the real config's ``shift_terminal`` stretch is dropped too, since
        ComfyUI's schedule ends at sigma 0 without it.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(
            self.scheduler_config(), use_dynamic_shifting=False, shift=float(params.shift),
            shift_terminal=None)

    @staticmethod
    def base_sigmas(params: StageParameters) -> np.ndarray:
        """The unshifted sigmas of the steps that run (the scheduler applies the shift).

        ``simple`` is the pipeline's ``linspace(1, 1/n, n)`` (ComfyUI's simple scheduler on a flow
        model up to rounding of the table index). ``normal`` is ComfyUI's: evenly spaced model
        timesteps from sigma_max to sigma_min. With denoise < 1 the schedule has
        ``int(steps / denoise)`` steps of which the last ``steps`` run (ComfyUI's KSampler).
        """
        if params.sampler not in SAMPLERS:
            raise PermanentError(f"sampler {params.sampler!r} is not supported by the diffusers engine "
                                 f"(field 'sampler'; supported: {', '.join(SAMPLERS)})")
        if params.scheduler not in SCHEDULERS:
            raise PermanentError(f"scheduler {params.scheduler!r} is not supported by the diffusers "
                                 f"engine (field 'scheduler'; supported: {', '.join(SCHEDULERS)})")
        steps = int(params.steps)
        total = steps if params.denoise >= 1 else max(steps, int(steps / params.denoise))
        if params.scheduler == "simple":
            sigmas = np.linspace(1.0, 1 / total, total)
        else:
            shift = float(params.shift)
            sigma_min = shift * 0.001 / (1 + (shift - 1) * 0.001)
            sigmas = np.linspace(1.0, sigma_min, total)
        return sigmas[-steps:]

    @engine_operation
    def sample(self, prepared: Payload, latent: Payload, text: Payload, params: StageParameters,
               seed: int, resume: Optional[SampleResume], on_step: Optional[StepCallback],
               should_stop: Optional[Callable[[], bool]] = None) -> Payload:
        from diffusers.utils.torch_utils import randn_tensor

        sigmas = self.base_sigmas(params)  # validates sampler/scheduler before loading anything
        transformer = self._transformer(params)
        device = self.device
        height, width = int(latent["height"]), int(latent["width"])
        scale = 8  # vae_scale_factor of Qwen-Image's VAE (2 ** len(temperal_downsample))
        channels = transformer.config.in_channels // 4

        prompt_embeds = text["prompt_embeds"].to(device)
        prompt_mask = _to(text.get("prompt_embeds_mask"), device)
        negative_embeds = _to(text.get("negative_prompt_embeds"), device)
        negative_mask = _to(text.get("negative_prompt_embeds_mask"), device)
        do_true_cfg = params.cfg > 1 and negative_embeds is not None
        image_latents = latent["image_latents"].to(device=device, dtype=prompt_embeds.dtype)
        img_shapes = [[(1, height // scale // 2, width // scale // 2),
                       *[tuple(int(v) for v in shape) for shape in latent["image_shapes"]]]]

        scheduler = self.make_scheduler(params)
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = scheduler.timesteps
        steps = len(timesteps)

        with torch.inference_mode():
            if resume is not None:
                if not 0 <= resume.step <= steps:
                    raise PermanentError(f"cannot resume sampling after step {resume.step} of {steps}")
                start = int(resume.step)
                latents = resume.state["latents"].to(device=device, dtype=prompt_embeds.dtype)
            else:
                start = 0
                # The pipeline's prepare_latents: randn on the 5-D latent shape from a CPU
                # generator (so it does not depend on the device), then packed.
                generator = torch.Generator("cpu").manual_seed(int(seed))
                shape = (1, 1, channels, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))
                noise = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
                latents = _pack(noise, channels)
                if params.denoise < 1:
                    init = latent.get("init_latents")
                    if init is None:
                        raise PermanentError("denoise < 1 needs the encode_latent result made for it")
                    init = init.to(device=device, dtype=latents.dtype)
                    scheduler.set_begin_index(0)
                    # ComfyUI (flow models): x = sigma * noise + (1 - sigma) * latent at the first kept sigma.
                    latents = scheduler.scale_noise(init, timesteps[:1], latents)
            expected = (1, (height // 16) * (width // 16), channels * 4)
            if tuple(latents.shape) != expected:
                raise PermanentError(f"latents of shape {tuple(latents.shape)} do not fit {width}x{height}")

            scheduler.set_begin_index(start)
            attention_kwargs: dict[str, Any] = {}
            for i in range(start, steps):
                if should_stop is not None and should_stop():
                    raise StageInterrupted(f"sampling stopped after step {i} of {steps}")
                t = timesteps[i]
                latent_model_input = torch.cat([latents, image_latents], dim=1)
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                with transformer.cache_context("cond"):
                    noise_pred = transformer(
                        hidden_states=latent_model_input, timestep=timestep / 1000, guidance=None,
                        encoder_hidden_states_mask=prompt_mask, encoder_hidden_states=prompt_embeds,
                        img_shapes=img_shapes, attention_kwargs=attention_kwargs, return_dict=False,
                    )[0]
                    noise_pred = noise_pred[:, : latents.size(1)]
                if do_true_cfg:
                    with transformer.cache_context("uncond"):
                        neg_noise_pred = transformer(
                            hidden_states=latent_model_input, timestep=timestep / 1000, guidance=None,
                            encoder_hidden_states_mask=negative_mask,
                            encoder_hidden_states=negative_embeds, img_shapes=img_shapes,
                            attention_kwargs=attention_kwargs, return_dict=False,
                        )[0]
                    neg_noise_pred = neg_noise_pred[:, : latents.size(1)]
                    noise_pred = self.guide(noise_pred, neg_noise_pred, params.cfg,
                                            params.cfg_norm_strength)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(i + 1, {"latents": latents})
        return {"latents": latents, "height": height, "width": width}

    @staticmethod
    def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, norm_strength: float) -> torch.Tensor:
        """True CFG with the pipeline's norm rescale (ComfyUI's CFGNorm), blended by strength:
        factor = 1 + s * (|cond| / |combined| - 1); s = 1 is exactly the pipeline's formula."""
        combined = uncond + cfg * (cond - uncond)
        if norm_strength == 0:
            return combined
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        noise_norm = torch.norm(combined, dim=-1, keepdim=True)
        ratio = cond_norm / noise_norm
        if norm_strength != 1:
            ratio = 1 + norm_strength * (ratio - 1)
        return combined * ratio

    # Stage decode --------------------------------------------------------------------------------

    @engine_operation
    def decode(self, sampled: Payload, params: StageParameters) -> Payload:
        vae = self._vae(params)
        pipe = self._pipeline(vae=vae)
        height, width = int(sampled["height"]), int(sampled["width"])
        with torch.inference_mode():
            latents = sampled["latents"].to(self.device)
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents.to(vae.dtype)
            z_dim = vae.config.z_dim
            latents_mean = (torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
                            .to(latents.device, latents.dtype))
            latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
                latents.device, latents.dtype)
            latents = latents / latents_std + latents_mean
            image = vae.decode(latents, return_dict=False)[0][:, :, 0]
            # What ``QwenImageEditPlusPipeline(...).images`` gives: postprocessed to NumPy floats,
            # then the image processor's own 8-bit conversion.
            array = pipe.image_processor.postprocess(image, output_type="np")
        decoded = {"image": np.asarray(pipe.image_processor.numpy_to_pil(array)[0].convert("RGB"), dtype=np.uint8)}
        if params.bit_depth != 8:  # the float output carries more than 8 bits
            decoded["image16"] = np.clip(np.rint(np.asarray(array[0], dtype=np.float64) * 65535.0), 0,
                                         65535).astype(np.uint16)
        return decoded


def read_hints(root: Path) -> dict[str, int]:
    """Image areas for the VAE and the vision tower, and the VAE's tile size and stride in pixels
    when it tiles: ``qie_engine.json`` in ``root`` over the defaults."""
    hints = {"vae_image_area": DEFAULT_VAE_IMAGE_AREA,
             "condition_image_area": DEFAULT_CONDITION_IMAGE_AREA,
             "vae_tile_size": DEFAULT_VAE_TILE[0], "vae_tile_stride": DEFAULT_VAE_TILE[1]}
    smallest = {"vae_image_area": 256, "condition_image_area": 256, "vae_tile_size": 16, "vae_tile_stride": 8}
    path = root / ENGINE_HINTS_FILE
    if path.is_file():
        try:
            given = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PermanentError(f"{path}: unreadable engine hints ({exc})") from exc
        for key in hints:
            if key in given:
                value = given[key]
                if not isinstance(value, int) or value < smallest[key]:
                    raise PermanentError(f"{path}: {key} must be an integer >= {smallest[key]}")
                hints[key] = value
    if hints["vae_tile_size"] % 8 or hints["vae_tile_stride"] % 8 or hints["vae_tile_stride"] > hints["vae_tile_size"]:
        raise PermanentError(f"{path}: vae_tile_size and vae_tile_stride must be multiples of 8, "
                             f"the stride at most the size")
    return hints


def model_sizes(settings: Settings, root: Optional[Path], dtype: torch.dtype) -> ModelSizes:
    """Each role's weights in ``dtype`` (their safetensors files scaled from the files' dtype),
    the GGUF file's size and torchao's bits per weight, without loading anything."""
    bits = torch.finfo(dtype).bits
    sizes = {}
    for role in ROLE_FOLDERS:
        folder = root / role if root is not None else None
        weights = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
        sizes[role] = int(sum(path.stat().st_size for path in weights) * bits / _file_bits(weights))
    gguf = settings.gguf_file
    return ModelSizes(**sizes, compute_bits=bits,
                      gguf=gguf.stat().st_size if gguf is not None and gguf.is_file() else None,
                      torchao_bits=TORCHAO_CONFIGS[settings.torchao_quantization][1])


def profile_choice(settings: Settings, device: torch.device, sizes: ModelSizes) -> Choice:
    """The configured memory profile, or for ``auto`` the one that fits the free device memory
    now (stages/memory_profiles.py decides)."""
    from stages.memory_profiles import peak_estimate
    name = settings.memory_profile
    if name != "auto":
        profile = PROFILES[name]
        return Choice(profile, "set by memory_profile", peak_estimate(profile, sizes))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return choose_profile(device.type, free, sizes, settings.gguf_file is not None, _host_available())


def _profile_checks(settings: Settings, root: Path) -> list[Check]:
    """doctor: the memory profile in force and why, and the files and libraries it needs."""
    try:
        device = resolve_device(settings.device)
        sizes = model_sizes(settings, root if root.is_dir() else None, resolve_dtype(settings.dtype, device))
        choice = profile_choice(settings, device, sizes)
    except (PermanentError, OSError, RuntimeError) as exc:
        return [Check("memory profile", False, f"cannot choose: {exc}")]
    profile = choice.profile
    checks = [Check("memory profile", True,
                    f"{profile.name}: {choice.reason}; {profile.summary}; estimated peak "
                    f"{choice.peak / GiB:.1f} GiB",
                    data={"profile": profile.name, "reason": choice.reason, "estimated_peak_bytes": choice.peak,
                          "model_bytes": {role: sizes.of(role) for role in ROLE_FOLDERS}})]
    if profile.transformer is Storage.GGUF:
        gguf = settings.gguf_file
        checks.append(Check("gguf file", gguf is not None and gguf.is_file(), str(gguf or "gguf_file is not set")))
    for storage, module in ((Storage.GGUF, "gguf"), (Storage.TORCHAO, "torchao")):
        if profile.transformer is storage:
            version = _version(module)
            checks.append(Check(module, version != "missing",
                                f"{module} {version}" if version != "missing" else
                                f"not importable (pip install 'qie-hotfolder[{module}]')"))
    return checks


def gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors (diffusers' reader), with ComfyUI's ``model.diffusion_model.`` /
    ``diffusion_model.`` key prefixes removed."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    try:
        state = load_gguf_checkpoint(str(path))
    except (ValueError, OSError, KeyError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise PermanentError(f"GGUF file {path} is not readable ({_first_line(exc)})") from exc
    renamed = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        renamed[key] = value
    return renamed


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module)
    except PackageNotFoundError:
        return "missing"


def _host_available() -> Optional[int]:
    """Host memory available now (``MemAvailable``), None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _file_bits(weights: list[Path]) -> int:
    """Bits per weight in safetensors files (read from their headers; 16 when unknown)."""
    from stages.checkpoint import header_of
    for path in weights:
        try:
            with open(path, "rb") as handle:
                head = handle.read(8)
                header = header_of(head + handle.read(int.from_bytes(head, "little")))
        except (OSError, ValueError):
            continue
        for name, entry in header.items():
            if name != "__metadata__":
                return {"F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8}.get(
                    entry.get("dtype"), 16)
    return 16


def _pack(latents: torch.Tensor, channels: int) -> torch.Tensor:
    """2x2 packing of [B, 1, C, H, W] latents (the pipeline's static ``_pack_latents``)."""
    from diffusers import QwenImageEditPlusPipeline
    height, width = latents.shape[-2:]
    return QwenImageEditPlusPipeline._pack_latents(latents, latents.shape[0], channels, height, width)


@contextmanager
def _model_files(path: Path) -> Iterator[None]:
    """A component folder without the files from_pretrained needs is a missing model, not a crash.
    OSErrors with an errno (I/O, disk) pass through so that they are classified as transient."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise ModelNotFoundError(f"model files missing or unusable in {path}: {exc}") from exc


def _to(value: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if value is None else value.to(device)


# LoRA ------------------------------------------------------------------------------------------

_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")


def lora_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file as peft-format keys of the transformer (``<module>.lora_A.weight`` / ``lora_B``).

    Accepts the layouts Qwen-Image LoRAs ship in: bare diffusers names (Lightning), with a
    ``diffusion_model.`` or ``transformer.`` prefix, and kohya-style ``lora_down``/``lora_up`` with
    ``alpha`` (folded into B as alpha / rank).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PermanentError(f"LoRA file {path} is not a readable safetensors file ({exc})") from exc
    renamed: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = value
        else:
            renamed[key] = value
    for module, alpha in alphas.items():
        b_key = f"{module}.lora_B.weight"
        if b_key in renamed:
            rank = renamed[b_key].shape[1]
            renamed[b_key] = (renamed[b_key].float() * (float(alpha) / rank)).to(renamed[b_key].dtype)
    return renamed


def apply_lora(transformer: torch.nn.Module, path: Path, strength: float, dtype: torch.dtype,
               fuse: bool = True) -> None:
    """Load a LoRA into the transformer with peft, check that it really landed, fuse it at ``strength``
    (or, on quantized weights that cannot take it, keep it beside them at ``strength``).

    diffusers' ``load_lora_weights`` silently skips keys without the ``transformer.`` prefix
    (DESIGN section 8), so this uses ``load_lora_adapter(prefix=None)`` and then compares every
    module's adapter weights with the file's: a LoRA that matches nothing is an error.
    """
    state = {k: v.to(dtype) for k, v in lora_state_dict(path).items()}
    modules = sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    if not modules:
        raise PermanentError(f"LoRA file {path} has no LoRA weights (no '.lora_A'/'.lora_down' keys)")
    try:
        transformer.load_lora_adapter(state, prefix=None, adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PermanentError(f"LoRA file {path} does not fit the diffusion model ({exc})") from exc
    matched, missing = 0, []
    named = dict(transformer.named_modules())
    for name in modules:
        module = named.get(name)
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if (lora_a is not None and ADAPTER_NAME in lora_a and lora_b is not None
                and torch.equal(lora_a[ADAPTER_NAME].weight, state[f"{name}.lora_A.weight"])
                and torch.equal(lora_b[ADAPTER_NAME].weight, state[f"{name}.lora_B.weight"])):
            matched += 1
        else:
            missing.append(name)
    if matched == 0:
        raise PermanentError(f"LoRA file {path}: none of its {len(modules)} layers matched the "
                             f"diffusion model (first: {modules[0]!r}); wrong model or key format?")
    if missing:
        log.warning("LoRA %s: %d of %d layers not applied (first: %s)", path.name, len(missing),
                    len(modules), missing[0])
    if fuse:
        # Merge into the weights, as ComfyUI's LoraLoaderModelOnly patches them: W + strength * B A.
        transformer.fuse_lora(lora_scale=strength, adapter_names=[ADAPTER_NAME])
    else:
        transformer.set_adapters([ADAPTER_NAME], weights=[strength])
    log.info("LoRA %s applied to %d layers at strength %s", path.name, matched, strength)
