"""The job file: what a user drops into the inbox, validated.

A job file is JSON. Every stage parameter is optional; a missing one takes the daemon's
default (``[defaults]`` in the configuration), which in turn defaults to ComfyUI's
``image_qwen_image_edit_2509`` template. Unknown keys are errors, so a typo such as
``"step": 8`` is reported instead of silently ignored.
"""

from __future__ import annotations

import json
import string
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from config.untrusted import control_characters

# KSampler's largest seed (0xffffffffffffffff); torch.Generator.manual_seed and NumPy's default_rng
# take it too. Above 2**53 - 1 a job file must be written by a JSON writer that keeps integers exact
# (Python's does; JavaScript's rounds them).
MAX_SEED = 2**64 - 1
# The longest job or output name, in bytes of UTF-8: file systems allow 255 bytes per name, and the
# daemon adds suffixes (``-<seed>``, ``-<n>``, ``.error.json``, ``<job id>-``).
MAX_NAME_BYTES = 200
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
OutputSize = Literal["model", "input"]
BitDepth = Literal[8, 16, "input"]


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
    # Read when publishing, by no stage (so not in any fingerprint, like output_format): the
    # decoded picture is resized from the checkpoint, which stays the model's own pixels.
    output_size: Annotated[OutputSize, Field(description="Size of the published image: `model` (the size the model worked at, about `megapixels`) or `input` (image1's own size and aspect, resized with Lanczos).")] = "model"
    # Read by decode (in its fingerprint): the engine hands over 16-bit pixels as well.
    bit_depth: Annotated[BitDepth, Field(description="Bits per channel of a PNG output: 8, 16, or `input` (16 when image1 has more than 8 bits per channel). 16-bit pixels come from the VAE's float output; JPEG and WebP are always 8-bit.")] = 8

    @model_validator(mode="after")
    def _sixteen_bits_are_png(self) -> "StageParameters":
        if self.bit_depth == 16 and self.output_format != OutputFormat.PNG.value:
            raise ValueError(f"bit_depth 16 needs output_format png (not {self.output_format})")
        return self

    @field_validator("lora")
    @classmethod
    def _lora_is_a_plain_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("/" in value or "\\" in value or value.startswith(".")):
            raise ValueError("must be a file name inside the LoRA folder, not a path")
        return value


# Output naming and metadata: read when publishing; they change no pixel ------------------------

NAME_FIELDS = ("name", "preset", "seed", "date", "time", "n")
FORBIDDEN_IN_NAMES = '/\\<>:"|?*'  # folders, and what SMB/Windows shares refuse
MAX_OUTPUT_NAME_BYTES = 200  # room for a clash suffix, the extension and a temporary name in 255


def _name_fields(template: str) -> list[str]:
    """The placeholders of a naming template; ValueError naming what is wrong."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc}); write a brace as {{{{ or }}}}") from exc
    fields = []
    for literal, name, spec, conversion in parsed:
        bad = sorted({c for c in literal if c in FORBIDDEN_IN_NAMES or ord(c) < 32 or c == "\x7f"})
        if bad:
            raise ValueError(f"{template!r} contains characters not allowed in file names: "
                             + " ".join(repr(c) for c in bad))
        if name is None:
            continue
        if name not in NAME_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} (known: "
                             + ", ".join("{" + f + "}" for f in NAME_FIELDS) + ")")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion")
        fields.append(name)
    return fields


NUMBER_MARKER = "\x00"  # where {n} goes: no file name, template or output_name holds a NUL


def render_output_name(template: str, name: str, preset: Optional[str], seed: int, when: datetime,
                       n: Optional[int] = None) -> str:
    """An output's base name from ``template``; ``{n}`` becomes NUMBER_MARKER when ``n`` is None."""
    return template.format(name=name, preset=preset or "", seed=seed, date=when.strftime("%Y-%m-%d"),
                           time=when.strftime("%H%M%S"), n=NUMBER_MARKER if n is None else n)


def check_output_name(template: str, name: str, preset: Optional[str], seed: int) -> str:
    """The name ``template`` gives (with the longest date, time and counter); ValueError when it
    is not a usable file name."""
    _name_fields(template)
    longest = render_output_name(template, name, preset, seed, datetime(2000, 12, 31, 23, 59, 59), 99999)
    size = len(longest.encode("utf-8", "surrogateescape"))
    if size > MAX_OUTPUT_NAME_BYTES:
        raise ValueError(f"the output name {longest[:60]!r}... would be {size} bytes, more than "
                         f"{MAX_OUTPUT_NAME_BYTES} (file names hold 255 bytes with the extension and "
                         "a temporary name)")
    if not longest.strip() or longest.startswith("."):
        raise ValueError(f"the output name {longest!r} would be empty or hidden (starting with a dot)")
    return longest


ColourProfile = Literal["srgb", "input"]


class OutputOptions(BaseModel):
    """How outputs are named and what they carry besides pixels (configured under ``[output]``;
    a job file or preset may set each)."""

    model_config = ConfigDict(extra="forbid")

    name_template: Annotated[str, Field(min_length=1, max_length=200, description="Output base name: `{name}` (output_name, else the job's or photo's name), `{preset}`, `{seed}`, `{date}` (YYYY-MM-DD), `{time}` (HHMMSS, local time of publishing), `{n}` (1, 2, ... the first free number). Never overwrites: without `{n}` a taken name gets `-1`, `-2`, ....")] = "{name}"
    strip_location: Annotated[bool, Field(description="Drop GPS position from the metadata carried over from image1.")] = False
    strip_metadata: Annotated[bool, Field(description="Carry over no metadata from image1 at all (EXIF, XMP); the colour profile and the edit's provenance are still written.")] = False
    colour_profile: Annotated[ColourProfile, Field(description="`srgb`: the output is sRGB, tagged so (the model works in sRGB, every viewer shows it right). `input`: converted back into image1's RGB ICC profile (e.g. Display P3, Adobe RGB) and tagged with it; 8-bit outputs of RGB-profiled inputs only.")] = "srgb"

    @field_validator("name_template")
    @classmethod
    def _template_is_valid(cls, value: str) -> str:
        _name_fields(value)
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
    output_name: Annotated[Optional[str], Field(min_length=1, max_length=200, description="Base name of the outputs, `{name}` in `name_template` (default: the job's name).")] = None
    priority: Annotated[int, Field(ge=-100, le=100, description="Higher runs first.")] = 0
    notify: Annotated[Optional[list[Annotated[str, Field(min_length=4, max_length=2000, pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://")]]], Field(max_length=10, description="Apprise URLs told when this job is done or failed (in a preset.json: every job of the preset), besides the daemon's `notify_urls`; see docs/web.md.")] = None
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
    output_size: Optional[OutputSize] = None
    bit_depth: Optional[BitDepth] = None
    # Output options, each optional: absent means the configured ``[output]`` value.
    name_template: Optional[str] = None
    strip_location: Optional[bool] = None
    strip_metadata: Optional[bool] = None
    colour_profile: Optional[ColourProfile] = None

    @field_validator("name_template")
    @classmethod
    def _template_is_valid(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            _name_fields(value)
        return value

    @field_validator("output_name")
    @classmethod
    def _output_name_is_plain(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            if "/" in value or "\\" in value or value.startswith("."):
                raise ValueError("must be a plain file name without folders or a leading dot")
            check_name_text(value)
        return value

    @field_validator("image1", "image2", "image3")
    @classmethod
    def _path_has_no_control_characters(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            unsafe = control_characters(value)
            if unsafe:
                raise ValueError(f"contains control characters ({', '.join(unsafe)})")
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

    def output_options(self, defaults: OutputOptions) -> OutputOptions:
        """Effective output options: this file's values over ``defaults``."""
        given = {name: getattr(self, name) for name in OutputOptions.model_fields if getattr(self, name) is not None}
        return defaults.model_copy(update=given)

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


# Field descriptions of the optional stage parameters and output options are their models' ones.
for _name, _field in {**StageParameters.model_fields, **OutputOptions.model_fields}.items():
    if JobFile.model_fields[_name].description is None:
        JobFile.model_fields[_name].description = _field.description
JobFile.model_rebuild(force=True)


def check_name_text(name: str) -> None:
    """ValueError unless ``name`` works as (part of) a file name: no control characters, at
    most MAX_NAME_BYTES bytes."""
    unsafe = control_characters(name)
    if unsafe:
        raise ValueError(f"contains control characters ({', '.join(unsafe)})")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"is {size} bytes long; at most {MAX_NAME_BYTES} bytes (UTF-8) are allowed, since "
                         "the outputs and reports add to it")


def check_job_name(name: str, source: str) -> None:
    """JobFileError unless the job's name (its file's or folder's name) works for its outputs."""
    try:
        check_name_text(name)
    except ValueError as exc:
        raise JobFileError(source, f"the job's name {exc}; rename it") from None


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
        if field is None:
            field = next((name for name in StageParameters.model_fields if exc_msg.startswith(name)
                          or f"Value error, {name}" in exc_msg), None)
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
