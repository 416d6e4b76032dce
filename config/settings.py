"""Daemon settings.

Precedence, lowest first: built-in defaults < TOML file (``--config FILE``, else
``qie-hotfolder.toml`` in the working folder) < environment (``QIE_*``; nested with ``__``,
e.g. ``QIE_DEFAULTS__STEPS=8``) < command-line flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from config.job import OutputOptions, StageParameters

DEFAULT_CONFIG_FILE = "qie-hotfolder.toml"


class ConfigurationError(ValueError):
    """Settings that cannot work; raised at start-up, before anything is touched."""


class FakeEngineSettings(BaseModel):
    """The fake engine's knobs (``engine = "fake"``: tests and benchmarks, outputs are the inputs)."""

    model_config = ConfigDict(extra="forbid")

    unit_seconds: float = Field(0.0, ge=0, description="Seconds every stage takes (sampling spreads them over its steps).")
    sample_seconds: Optional[float] = Field(None, ge=0, description="Seconds sampling takes (unset: `unit_seconds`), for a sampling-heavy job like the real model's.")
    vae_bytes: int = Field(1_000_000, ge=1, description="Size of the fake VAE in the model cache.")
    text_encoder_bytes: int = Field(4_000_000, ge=1, description="Size of the fake text encoder.")
    transformer_bytes: int = Field(8_000_000, ge=1, description="Size of the fake diffusion model.")
    available_loras: Optional[list[str]] = Field(None, description="LoRA names that exist (unset: every name).")

    def model_bytes(self, role: str) -> int:
        return int(getattr(self, f"{role}_bytes"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QIE_", env_nested_delimiter="__", extra="forbid",
                                      validate_default=True)

    # Folders
    inbox: Path = Field(Path("inbox"), description="Where users drop job files and images.")
    outbox: Path = Field(Path("outbox"), description="Where edited images and their manifests appear.")
    failed: Path = Field(Path("failed"), description="Where failed jobs' original files and error reports go.")
    archive: Path = Field(Path("archive"), description="Where finished jobs' original files go (see `originals`).")
    work: Path = Field(Path("work"), description="Checkpoints and ingested inputs. Keep on local disk.")
    state: Path = Field(Path("state.db"), description="SQLite database file (used when `database_url` is not set). Keep on local disk.")
    database_url: Optional[str] = Field(None, description="SQLAlchemy URL; default `sqlite:///<state>`.")

    # What happens to files
    originals: Literal["archive", "delete"] = Field("archive", description="Finished jobs' originals: moved to `archive` or deleted.")

    # Watching
    watch_mode: Literal["auto", "native", "polling"] = Field("auto", description="`native` (inotify), `polling` (network shares), or `auto`: polling when the inbox is on NFS/SMB/FUSE.")
    poll_interval: float = Field(1.0, gt=0, description="Seconds between polls of the inbox in polling mode, and of the queue when several daemons share it (PostgreSQL) or this one does not watch the inbox.")
    rescan_interval: float = Field(30.0, gt=0, description="Seconds between full rescans of the inbox (events are hints, the scan is truth).")
    settle_seconds: float = Field(2.0, ge=0, description="A file is ready when its size and mtime have not changed for this long.")
    missing_file_timeout: float = Field(3600.0, gt=0, description="A job waiting this long for a file it names fails, naming the file.")
    settle_after_close: float = Field(0.5, ge=0, description="With native events: a file its writer closed (or renamed into place) is ready after this long unchanged, instead of `settle_seconds`.")
    corrupt_grace_seconds: float = Field(30.0, ge=0, description="An image that does not decode is given this long (stable) to finish arriving before the job fails.")
    max_job_file_bytes: int = Field(1_000_000, gt=0, description="Job files larger than this are rejected.")
    max_image_pixels: int = Field(100_000_000, gt=0, description="Images with more pixels are rejected (decompression-bomb guard).")
    max_aspect_ratio: float = Field(20.0, ge=1, description="Images whose long side is more than this many times their short side are refused at ingest (the engine may allow less; the error names the limit).")

    # Engine and models
    engine: Literal["diffusers", "comfyui", "fake"] = Field("diffusers", description="Which library computes the stages: `diffusers`, `comfyui`, or `fake` (tests and benchmarks: no model, the output is the input).")
    model_path: Optional[Path] = Field(None, description="diffusers-format Qwen-Image-Edit-2509 folder. Unset: the built-in tiny random model under `<work>/models/tiny` (outputs are noise).")
    lora_dir: Optional[Path] = Field(None, description="Folder of LoRA files for the diffusers engine. Default: `<model_path>/loras`.")
    comfyui_path: Optional[Path] = Field(None, description="ComfyUI checkout used as a library (engine `comfyui`).")
    comfyui_extra_model_paths: list[Path] = Field(default_factory=list, description="More `extra_model_paths.yaml` files for the ComfyUI engine (the checkout's own is always read).")
    comfyui_custom_nodes: bool = Field(False, description="Load the ComfyUI checkout's `custom_nodes` (node packs, e.g. ones that add model folders or loaders), as ComfyUI does at start-up; their prestartup scripts are not run.")
    comfyui_args: list[str] = Field(default_factory=list, description="ComfyUI command-line options passed on, checked with ComfyUI's own parser, e.g. `[\"--fast\", \"--use-sage-attention\"]`; options of its web server are accepted and change nothing.")
    vae_name: str = Field("qwen_image_vae.safetensors", description="ComfyUI VAE file (folder `vae`).")
    text_encoder_name: str = Field("qwen_2.5_vl_7b_fp8_scaled.safetensors", description="ComfyUI text encoder file (folder `text_encoders`).")
    diffusion_model_name: str = Field("qwen_image_edit_2509_fp8_e4m3fn.safetensors", description="ComfyUI diffusion model file (folder `diffusion_models`).")
    weight_dtype: Literal["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"] = Field("default", description="UNETLoader weight_dtype (ComfyUI engine).")
    vram_mode: Literal["auto", "lowvram", "normalvram", "highvram", "novram"] = Field("auto", description="ComfyUI memory mode.")
    reserve_vram_gb: Optional[float] = Field(None, ge=0, description="VRAM ComfyUI leaves free, in GB.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Compute dtype; `auto`: bfloat16 on CUDA, float32 on CPU.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: min(cores, 8). Fixed so that results are reproducible.")
    model_memory_budget: Optional[int] = Field(None, gt=0, description="Bytes of loaded models kept in the cache; the least recently used are evicted. Unset: 90% of the GPU's memory on CUDA, of RAM on the CPU.")
    model_load_delay: float = Field(0.0, ge=0, description="Seconds added to every model load (benchmarks: imitate real model load times).")

    # Memory profiles (diffusers engine, stages/memory_profiles.py)
    memory_profile: Literal["auto", "full", "fp8", "fp8-offload-text", "fp8-offload", "offload", "gguf", "torchao"] = Field("auto", description="How the diffusers engine holds its models on the device (docs/performance.md). `full`: all in the compute dtype; `fp8`: diffusion model and text encoder stored as float8, computing in the compute dtype; `fp8-offload-text`: the same, the text encoder group-offloaded, VAE tiling (24 GB cards); `fp8-offload`: both offloaded (16 GB and smaller); `offload`: both offloaded in the compute dtype (results as `full`); `gguf`: the diffusion model from `gguf_file`; `torchao`: the diffusion model quantized by torchao; `auto`: `gguf` when `gguf_file` is set, else the first of full, fp8, fp8-offload-text, fp8-offload that fits the free GPU memory (`doctor` says which and why). Profiles that change the numbers are part of the checkpoint fingerprints.")
    gguf_file: Optional[Path] = Field(None, description="A GGUF file of the diffusion model (e.g. Qwen-Image-Edit-2509-Q4_K_M.gguf) for `memory_profile = \"gguf\"`; its configuration is read from `<model_path>/transformer`.")
    torchao_quantization: Literal["int8-weight", "int8-dynamic", "float8-weight", "float8-dynamic"] = Field("int8-weight", description="torchao quantization of the diffusion model for `memory_profile = \"torchao\"` (float8 needs a GPU that computes in float8).")
    vae_tiling: Optional[bool] = Field(None, description="The VAE encodes and decodes in tiles (less memory on large images, slightly different pixels). Unset: as the memory profile says.")

    # Queue
    scheduling: Literal["auto", "stage-major", "job-by-job"] = Field("auto", description="`auto`: jobs in order when every model the queued work needs fits `model_memory_budget` together, else grouped by model in windows of `batch_window` jobs; `stage-major`: run a stage for every ready job while its models are loaded (fewest loads, latest first result); `job-by-job`: finish one job before the next.")
    batch_window: int = Field(6, ge=1, le=1000, description="With `scheduling = \"auto\"` when the models do not fit together: how many jobs share each model load. Larger saves loads, smaller gives earlier results; no job waits behind more than one window of others.")
    prefetch: bool = Field(True, description="While a unit runs, prepare the next job's images and load the next unit's models where they fit beside the loaded ones, so the device does not wait between jobs.")
    max_wait: float = Field(600.0, gt=0, description="A job waiting longer than this (seconds since it was queued) runs before everything else.")
    max_attempts: int = Field(3, ge=1, description="Tries for a job whose errors are transient (out of memory, I/O, device).")
    retry_backoff: float = Field(30.0, ge=0, description="Seconds before the first retry; doubles each attempt.")
    max_crashes: int = Field(3, ge=1, description="A job that was running when the process died this many times is failed.")
    lease_seconds: float = Field(300.0, gt=0, description="How long a claim holds without renewal. The running daemon renews it every quarter of this (a heartbeat); a job whose lease expired (its machine died) is claimable again; every daemon looks for such jobs every half of this (at most every minute).")
    save_partials: bool = Field(True, description="Write the latent during sampling so a long run resumes mid-way.")
    partial_interval: float = Field(5.0, ge=0, description="Seconds of sampling between two partial latents (0: after every step).")

    # Checkpoint retention
    cache_max_age_days: float = Field(30.0, gt=0, description="Checkpoints unused for this long are removed.")
    cache_max_bytes: Optional[int] = Field(None, gt=0, description="Total size the checkpoint cache is trimmed to (oldest first).")
    archive_max_age_days: Optional[float] = Field(None, gt=0, description="Archived originals older than this are removed. Unset: kept.")
    archive_max_bytes: Optional[int] = Field(None, gt=0, description="Total size the archive is trimmed to (oldest first). Unset: no limit.")
    gc_interval: float = Field(3600.0, ge=0, description="Seconds between two clean-ups of checkpoints, the archive and work folders by the daemon (0: only `run.py gc`).")

    # Running as a service (systemd)
    watchdog_seconds: float = Field(120.0, ge=0, description="`WatchdogSec=` of the unit `install-service` writes (0: no watchdog). The daemon pings at half the interval systemd gives it.")
    stop_timeout: float = Field(120.0, gt=0, description="Seconds a graceful stop may take (the running step finishes and is checkpointed): the unit's `TimeoutStopSec=`, and what the daemon asks systemd for while it drains.")
    model_load_timeout: float = Field(600.0, gt=0, description="Seconds one model load may take before systemd takes the daemon for hung (asked for with `EXTEND_TIMEOUT_USEC` before each load).")

    # Web pages, API and metrics (web/); notifications (processor/notify.py)
    http_listen: str = Field("127.0.0.1:8765", pattern=r"^(off|[^\s:\[\]]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})$", description="`host:port` the daemon serves its web pages, JSON API and `/metrics` on (`run.py web` too), or `off`. On a loopback address no login is needed; on any other address a token is required (`http_token` or `http_token_file`), else the daemon refuses to start.")
    http_token: Optional[str] = Field(None, min_length=16, description="The token every page and API call needs when `http_listen` is not a loopback address (`Authorization: Bearer <token>`, or the login page). Unset: read from `http_token_file`.")
    http_token_file: Optional[Path] = Field(None, description="File holding the token (mode 0600, made by `python run.py http-token`). Default: `<work>/http-token`.")
    max_upload_bytes: int = Field(200_000_000, gt=0, description="Largest upload (all files of one request together) the web page and API accept.")
    notify_urls: list[str] = Field(default_factory=list, description="Apprise URLs notified of the events in `notify_on` (e.g. `ntfys://ntfy.sh/my-topic`, `mailtos://...`; see Apprise's documentation). Environment: a JSON list.")
    notify_webhook_url: Optional[str] = Field(None, pattern=r"^https?://", description="A URL that gets every event in `notify_on` as a JSON POST signed with HMAC-SHA256 (`X-Qie-Signature`, see docs/web.md).")
    notify_webhook_secret: Optional[str] = Field(None, min_length=16, description="The HMAC-SHA256 key of `notify_webhook_url`'s signatures (needed with it).")
    notify_on: list[Literal["done", "failed", "alarm"]] = Field(["done", "failed", "alarm"], description="Which events are notified: a job `done`, a job `failed`, an `alarm` (inbox missing, disk full, a broken preset).")
    notify_job_urls: bool = Field(True, description="Also notify the Apprise URLs a preset (or job) file names in `notify`. Anyone who can write to the inbox can then make the daemon contact those URLs.")
    notify_retry_backoff: float = Field(10.0, gt=0, description="Seconds before a failed delivery is tried again; doubles each attempt, at most an hour.")
    notify_max_attempts: int = Field(20, ge=1, description="Deliveries of one notification tried before it is given up (logged, and shown on the daemon page).")
    disk_alarm_bytes: int = Field(1_000_000_000, ge=0, description="An alarm is raised when a folder's disk has less free space than this (0: never).")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Log JSON lines instead of text.")

    defaults: StageParameters = Field(default_factory=StageParameters, description="Job parameter defaults (a job file's values win).")
    output: OutputOptions = Field(default_factory=OutputOptions, description="Output naming, metadata and colour defaults (a job file's or preset's values win).")
    fake: FakeEngineSettings = Field(default_factory=FakeEngineSettings, description="The fake engine's settings (tests and benchmarks).")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.engine == "comfyui" and self.comfyui_path is None:
            raise ValueError("engine 'comfyui' needs comfyui_path (QIE_COMFYUI_PATH)")
        if self.memory_profile == "gguf" and self.gguf_file is None:
            raise ValueError("memory_profile 'gguf' needs gguf_file (QIE_GGUF_FILE)")
        if self.notify_webhook_url and not self.notify_webhook_secret:
            raise ValueError("notify_webhook_url needs notify_webhook_secret (QIE_NOTIFY_WEBHOOK_SECRET) to sign with")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        toml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # Derived values --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.state}"

    @property
    def tiny_model_path(self) -> Path:
        return self.work / "models" / "tiny"

    @property
    def effective_model_path(self) -> Path:
        return self.model_path if self.model_path is not None else self.tiny_model_path

    @property
    def effective_lora_dir(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else self.effective_model_path / "loras"

    @property
    def effective_threads(self) -> int:
        return self.threads or min(os.cpu_count() or 1, 8)

    @property
    def effective_http_token_file(self) -> Path:
        return self.http_token_file if self.http_token_file is not None else self.work / "http-token"

    def relative_to_folders(self, text: str) -> str:
        """``text`` with this machine's absolute folder paths replaced by the names users know
        (``inbox/...``, ``work/...``, ``<LoRA folder>/...``): error reports, failed/ reports and
        ``status`` must not show the server's layout."""
        names = {**{str(path): name for name, path in self.folders().items()},
                 str(self.effective_lora_dir): "<LoRA folder>", str(self.effective_model_path): "<model folder>",
                 **({str(self.comfyui_path): "<ComfyUI>"} if self.comfyui_path else {}),
                 str(self.state.parent): "<database folder>"}
        for path in sorted(names, key=len, reverse=True):
            if path not in ("", "/"):
                text = text.replace(path, names[path])
        return text

    def folders(self) -> dict[str, Path]:
        return {"inbox": self.inbox, "outbox": self.outbox, "failed": self.failed,
                "archive": self.archive, "work": self.work}


# The settings that are also command-line flags (``--inbox``, ``--model-path``...), in the order
# ``--help`` lists them; the CLI builds its flags, and ``install-service`` passes them on, from this.
CLI_FLAGS = ("inbox", "outbox", "failed", "archive", "work", "state", "database_url", "engine", "model_path",
             "comfyui_path", "device", "dtype", "memory_profile", "log_level", "log_json", "http_listen")

_CONFIG_FILE: dict[str, Optional[Path]] = {"path": None}


def load_settings(config_file: Optional[os.PathLike[str] | str] = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, a TOML file, the environment and ``overrides``.

    ``config_file`` None means ``qie-hotfolder.toml`` in the working folder when it exists.
    Relative paths are made absolute against the working folder. Raises ConfigurationError.
    """
    path = Path(config_file) if config_file is not None else Path(DEFAULT_CONFIG_FILE)
    if config_file is not None and not path.is_file():
        raise ConfigurationError(f"configuration file not found: {path}")
    _CONFIG_FILE["path"] = path if path.is_file() else None
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigurationError(f"invalid configuration ({path if path.is_file() else 'environment/flags'}): {exc}") from exc
    finally:
        _CONFIG_FILE["path"] = None
    return _absolute(settings)


def path_settings() -> list[str]:
    """The settings that hold one path."""
    return [name for name, field in Settings.model_fields.items()
            if field.annotation in (Path, Optional[Path])]


def _absolute(settings: Settings) -> Settings:
    updates = {}
    for name in path_settings():
        value = getattr(settings, name)
        if value is not None:
            updates[name] = Path(os.path.abspath(os.path.expanduser(value)))
    return settings.model_copy(update=updates)
