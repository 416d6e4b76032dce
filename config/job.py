"""The job file: what a user drops into the inbox, validated.

A job file is JSON. Every stage parameter is optional; a missing one takes the daemon's
default (``[defaults]`` in the configuration), which in turn defaults to ComfyUI's
``image_qwen_image_edit_2509`` template. Unknown keys are errors, so a typo such as
``"step": 8`` is reported instead of silently ignored.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator

# KSampler's largest seed (0xffffffffffffffff); torch.Generator.manual_seed and NumPy's default_rng
# take it too. Above 2**53 - 1 a job file must be written by a JSON writer that keeps integers exact
# (Python's does; JavaScript's rounds them).
MAX_SEED = 2**64 - 1
REFERENCE_LORA = "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors"
IMAGE_KEYS = ("image1", "image2", "image3")


class OutputFormat(str, Enum):
    PNG = "png"
    JPG = "jpg"
    WEBP = "webp"


class ReferenceMode(str, Enum):
    """How reference images reach the text encoder.

    ``scaled``: TextEncodeQwenImageEditPlus rescales each image to about 1 MP (the template).
    ``raw_latent``: each image is VAE-encoded at its own size and attached as a reference
    latent (the template's "raw latent" variant; ComfyUI engine only).
    """

    SCALED = "scaled"
    RAW_LATENT = "raw_latent"


UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


class StageParameters(BaseModel):
    """Every parameter a stage reads. The defaults are the reference workflow's."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    megapixels: Annotated[float, Field(gt=0, le=16, description="Total pixels image1 is scaled to, in millions (ImageScaleToTotalPixels).")] = 1.0
    upscale_method: Annotated[UpscaleMethod, Field(description="Resampling filter for the scaling.")] = "lanczos"
    width: Annotated[Optional[int], Field(ge=16, le=8192, description="Custom output width (EmptySD3LatentImage variant); with height. Default: the scaled image1's size.")] = None
    height: Annotated[Optional[int], Field(ge=16, le=8192, description="Custom output height; with width.")] = None
    reference_mode: Annotated[ReferenceMode, Field(description="How reference images are attached: 'scaled' (template) or 'raw_latent'.")] = ReferenceMode.SCALED
    shift: Annotated[float, Field(gt=0, le=100, description="ModelSamplingAuraFlow shift.")] = 3.0
    cfg_norm_strength: Annotated[float, Field(ge=0, le=10, description="CFGNorm strength.")] = 1.0
    steps: Annotated[int, Field(ge=1, le=200, description="Sampling steps.")] = 4
    cfg: Annotated[float, Field(ge=0, le=50, description="Classifier-free guidance scale; above 1 with a negative prompt runs true CFG.")] = 1.0
    sampler: Annotated[str, Field(min_length=1, max_length=64, description="KSampler sampler_name.")] = "euler"
    scheduler: Annotated[str, Field(min_length=1, max_length=64, description="KSampler scheduler.")] = "simple"
    denoise: Annotated[float, Field(gt=0, le=1, description="KSampler denoise.")] = 1.0
    lora: Annotated[Optional[str], Field(max_length=255, description="LoRA file name (in the LoRA folder), or null for none.")] = REFERENCE_LORA
    lora_strength: Annotated[float, Field(ge=-10, le=10, description="LoRA strength (LoraLoaderModelOnly).")] = 1.0
    output_format: Annotated[OutputFormat, Field(description="Format of the published image.")] = OutputFormat.PNG
    quality: Annotated[int, Field(ge=1, le=100, description="JPEG/WebP quality.")] = 95

    @field_validator("lora")
    @classmethod
    def _lora_is_a_plain_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("/" in value or "\\" in value or value.startswith(".")):
            raise ValueError("must be a file name inside the LoRA folder, not a path")
        return value


class JobFile(BaseModel):
    """The JSON a user writes. Paths are relative to the job's own folder."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True, title="qie-hotfolder job file")

    prompt: Annotated[str, Field(max_length=20_000, description="What to do to image1.")]
    negative_prompt: Annotated[str, Field(max_length=20_000, description="Negative prompt (used with cfg > 1).")] = ""
    image1: Annotated[str, Field(min_length=1, max_length=1024, description="The image to edit, relative to the job file's folder.")]
    image2: Annotated[Optional[str], Field(max_length=1024, description="Optional reference image.")] = None
    image3: Annotated[Optional[str], Field(max_length=1024, description="Optional reference image.")] = None
    seed: Annotated[Optional[int], Field(ge=0, le=MAX_SEED, description="Sampler seed; a random one is chosen and recorded when absent.")] = None
    seeds: Annotated[Optional[list[Annotated[int, Field(ge=0, le=MAX_SEED)]]], Field(min_length=1, max_length=64, description="Several seeds: one output each, named `<output_name>-<seed>`; the encodings are computed once.")] = None
    variations: Annotated[Optional[int], Field(ge=1, le=64, description="N outputs with seeds seed, seed+1, ... (random when no seed), named `<output_name>-<seed>`.")] = None
    output_name: Annotated[Optional[str], Field(min_length=1, max_length=200, description="Base name of the outputs (default: the job's name).")] = None
    priority: Annotated[int, Field(ge=-100, le=100, description="Higher runs first.")] = 0
    # Stage parameters, each optional: absent means the configured default.
    megapixels: Optional[float] = None
    upscale_method: Optional[UpscaleMethod] = None
    width: Optional[int] = None
    height: Optional[int] = None
    reference_mode: Optional[ReferenceMode] = None
    shift: Optional[float] = None
    cfg_norm_strength: Optional[float] = None
    steps: Optional[int] = None
    cfg: Optional[float] = None
    sampler: Optional[str] = None
    scheduler: Optional[str] = None
    denoise: Optional[float] = None
    lora: Optional[str] = Field(default=None, description="LoRA file name, or \"none\" to run without one.")
    lora_strength: Optional[float] = None
    output_format: Optional[OutputFormat] = None
    quality: Optional[int] = None

    @field_validator("output_name")
    @classmethod
    def _output_name_is_plain(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("/" in value or "\\" in value or value.startswith(".") or "\x00" in value):
            raise ValueError("must be a plain file name without folders or a leading dot")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_alone_and_distinct(cls, value: Optional[list[int]], info: ValidationInfo) -> Optional[list[int]]:
        if value is not None and info.data.get("seed") is not None:
            raise ValueError("give either seeds or seed, not both")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("seeds must differ from each other")
        return value

    @field_validator("variations")
    @classmethod
    def _variations_without_seeds(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and info.data.get("seeds") is not None:
            raise ValueError("give either seeds or variations, not both")
        seed = info.data.get("seed")
        if value is not None and seed is not None and seed + value - 1 > MAX_SEED:
            raise ValueError(f"seed + variations - 1 must not pass the largest seed {MAX_SEED}")
        return value

    def images(self) -> dict[str, str]:
        """The named image paths, in order, as written in the file."""
        return {key: getattr(self, key) for key in IMAGE_KEYS if getattr(self, key)}

    def parameters(self, defaults: StageParameters) -> StageParameters:
        """Effective stage parameters: this file's values over ``defaults``, re-validated."""
        given = {name: getattr(self, name) for name in StageParameters.model_fields
                 if getattr(self, name) is not None}
        if given.get("lora") in ("none", ""):
            given["lora"] = None
        merged = {**defaults.model_dump(), **given}
        if (merged["width"] is None) != (merged["height"] is None):
            raise ValueError("width and height must be given together")
        return StageParameters.model_validate(merged)


# Field descriptions of the optional stage parameters are the StageParameters ones.
for _name, _field in StageParameters.model_fields.items():
    if JobFile.model_fields[_name].description is None:
        JobFile.model_fields[_name].description = _field.description
JobFile.model_rebuild(force=True)


class JobFileError(ValueError):
    """A job file that cannot be accepted; ``field`` names the offending key when known."""

    def __init__(self, path: str, message: str, field: Optional[str] = None):
        self.path = path
        self.field = field
        where = f"{path}: field '{field}'" if field else path
        super().__init__(f"{where}: {message}")


def parse_job_file(raw: bytes, path: str, defaults: StageParameters) -> tuple[JobFile, StageParameters]:
    """Parse and validate a job file's bytes; raise JobFileError naming the file and field."""
    job = _validated(JobFile, _json_object(raw, path), path)
    try:
        return job, job.parameters(defaults)
    except (ValidationError, ValueError) as exc:
        field = None
        if isinstance(exc, ValidationError):
            field = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
            exc_msg = exc.errors()[0]["msg"]
        else:
            exc_msg = str(exc)
            field = "width" if "width" in exc_msg else None
        raise JobFileError(path, exc_msg, field) from exc


def job_schema() -> dict[str, Any]:
    """The JSON Schema of the job file."""
    return JobFile.model_json_schema()


# Presets ----------------------------------------------------------------------------------------

PRESET_FIELDS_LEFT_OUT = {
    "image1": "a preset does not name image1: every image dropped into its folder is image1",
    "output_name": "a preset does not name outputs: each is named after its image",
}


def _preset_model() -> type[BaseModel]:
    fields = {name: (field.annotation, field) for name, field in JobFile.model_fields.items()
              if name not in PRESET_FIELDS_LEFT_OUT}
    return create_model("Preset", __config__=ConfigDict(extra="forbid", use_enum_values=True,
                                                       title="qie-hotfolder preset file"), **fields)


Preset = _preset_model()
Preset.__doc__ = ("A preset folder's ``preset.json``: a job file without image1 and output_name. Every image "
                  "dropped into the folder becomes a job with these values and the image as image1; image2 "
                  "and image3, when given, are files in the preset folder shared by all its jobs.")


def _validated(model: type[BaseModel], data: dict[str, Any], path: str) -> Any:
    """``model`` of ``data``, or a JobFileError naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise JobFileError(path, message, field) from exc


def _json_object(raw: bytes, path: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobFileError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise JobFileError(path, f"must be a JSON object, not {type(data).__name__}")
    return data


def parse_preset(raw: bytes, path: str, defaults: StageParameters) -> dict[str, Any]:
    """Parse and validate a preset file; its values as given. Raises JobFileError naming the field."""
    data = _json_object(raw, path)
    for key, why in PRESET_FIELDS_LEFT_OUT.items():
        if key in data:
            raise JobFileError(path, why, key)
    _validated(Preset, data, path)
    # What only the whole job can tell (width without height, seeds with seed, ...).
    parse_job_file(json.dumps({**data, "image1": "image.png"}).encode(), path, defaults)
    return data


def job_over_preset(preset: dict[str, Any], job_raw: Optional[bytes], image1: Optional[str], path: str,
                    defaults: StageParameters) -> tuple[JobFile, StageParameters]:
    """A preset's job: the preset's values, under a job file's (``job_raw``) or with ``image1``."""
    data = dict(preset)
    if job_raw is not None:
        data.update(_json_object(job_raw, path))
    if image1 is not None:
        data["image1"] = image1
    return parse_job_file(json.dumps(data).encode(), path, defaults)


def preset_schema() -> dict[str, Any]:
    """The JSON Schema of a preset file."""
    return Preset.model_json_schema()
