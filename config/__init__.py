"""Settings and the job file schema: the base every other package builds on."""

from config.job import (IMAGE_KEYS, MAX_SEED, REFERENCE_LORA, JobFile, JobFileError, OutputFormat,
                        ReferenceMode, StageParameters, job_schema, parse_job_file)
from config.settings import DEFAULT_CONFIG_FILE, ConfigurationError, Settings, load_settings

__all__ = [
    "IMAGE_KEYS", "MAX_SEED", "REFERENCE_LORA", "JobFile", "JobFileError", "OutputFormat",
    "ReferenceMode", "StageParameters", "job_schema", "parse_job_file",
    "DEFAULT_CONFIG_FILE", "ConfigurationError", "Settings", "load_settings",
]
