"""The job spec: what ingest stores for a job and every later reader uses, typed and versioned.

A job file says what a user wants; the spec is what the daemon decided at ingest: the effective
parameters (job file over preset over configured defaults), the seed (chosen when none was
given), the stored names of the input files, where the outputs go. It is stored as JSON in the
``jobs.spec`` column and read back through ``JobSpec.from_stored``, which upgrades older
versions, so a database written by an older version keeps working.

Versions:

1. (no ``version`` key) the same fields, written by the first releases.
2. ``version: 2``; ``inputs`` and ``result`` are typed alongside (``InputFile``, ``Published``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from config.job import OutputOptions, StageParameters

SPEC_VERSION = 2
IMAGE_ORDER = {"image1": 0, "image2": 1, "image3": 2}


class InputFile(BaseModel):
    """One file ingested with a job, as stored below its work folder's ``originals/``."""

    model_config = ConfigDict(frozen=True)

    key: Optional[str] = None  # image1..image3 when the job uses it as an image
    name: str  # relative to originals/
    sha256: str
    size: int


class JobSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[2] = SPEC_VERSION
    job_file: dict[str, Any] = Field(default_factory=dict)  # the job file (over its preset) as given
    job_file_name: str = "job.json"
    prompt: str = ""
    negative_prompt: str = ""
    images: dict[str, str] = Field(default_factory=dict)  # image key -> stored name
    seed: int = 0
    seed_source: str = "job file"
    parameters: StageParameters = Field(default_factory=StageParameters)
    is_folder: bool = False
    preset: Optional[str] = None
    outbox_subfolder: Optional[str] = None
    output_name: str = ""  # the value of ``{name}`` in ``output.name_template``
    output: OutputOptions = Field(default_factory=OutputOptions)  # naming, metadata, colour (rows before: defaults)

    @classmethod
    def from_stored(cls, data: Any) -> "JobSpec":
        """A spec as read from the database, whatever version wrote it."""
        if isinstance(data, JobSpec):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"a stored job spec must be a JSON object, not {type(data).__name__}")
        if data.get("version") in (None, 1):
            # Version 1: the same fields without a version (rows from before 0.2 may lack some;
            # they take the defaults, which only matter for showing old history).
            data = {**data, "version": SPEC_VERSION}
        return cls.model_validate(data)

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Published(BaseModel):
    """What publishing a job produced: the files in the outbox and where the originals went."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    image: str
    manifest: str = ""
    sha256: str = ""
    originals: str = ""


def image_inputs(inputs: list[InputFile]) -> list[InputFile]:
    """The inputs used as images, image1 first."""
    return sorted((i for i in inputs if i.key in IMAGE_ORDER), key=lambda i: IMAGE_ORDER[i.key])
