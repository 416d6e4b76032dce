"""Settings and the job file schema: the base every other package builds on."""

from config.job import (IMAGE_KEYS, MAX_NAME_BYTES, MAX_SEED, check_job_name, REFERENCE_LORA, JobFile, JobFileError, OutputFormat, Preset,
                        ReferenceMode, StageParameters, job_over_preset, job_schema, parse_job_file, parse_preset,
                        preset_schema)
from config.settings import CLI_FLAGS, DEFAULT_CONFIG_FILE, ConfigurationError, Settings, load_settings
from config.spec import InputFile, JobSpec, Published, image_inputs

__all__ = [
    "IMAGE_KEYS", "MAX_NAME_BYTES", "MAX_SEED", "check_job_name", "REFERENCE_LORA", "JobFile", "JobFileError", "OutputFormat",
    "ReferenceMode", "StageParameters", "job_schema", "parse_job_file", "Preset", "job_over_preset",
    "parse_preset", "preset_schema",
    "CLI_FLAGS", "DEFAULT_CONFIG_FILE", "ConfigurationError", "Settings", "load_settings",
    "InputFile", "JobSpec", "Published", "image_inputs",
]
