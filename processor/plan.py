"""A job's plan: its stage inputs and the fingerprint of every stage, worked out before anything
runs, and what it still needs.

Walking back from the final stage, every stage without a recorded checkpoint is needed; the
needed stages whose inputs all exist can run now. So a job resumes at the first missing
checkpoint, a changed seed reruns only ``sample`` and ``decode``, and a seed sweep encodes once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from config import Settings, StageParameters, image_inputs
from db import Job
from stages import BY_NAME, Engine, JobInputs, fingerprint_chain, runnable_stages

PUBLISH = "publish"  # the unit that publishes a job whose final checkpoint exists
FINAL = next(stage.name for stage in BY_NAME.values() if stage.final)


@dataclass(frozen=True)
class JobPlan:
    """What a job computes: its stage inputs and the fingerprint of every stage."""

    job_id: int
    job: JobInputs
    params: StageParameters
    image_paths: tuple[tuple[str, Path], ...]
    identities: dict[str, str]
    chain: dict[str, str]
    engine_id: str

    def next_units(self, recorded: set[str] | frozenset[str]) -> list[str]:
        """The units of this job that can run now, given the fingerprints with a checkpoint."""
        if self.chain[FINAL] in recorded:
            return [PUBLISH]
        return runnable_stages(self.chain, recorded)


class Planner:
    """Plans jobs (once per process each: model files are looked up here) for one engine."""

    def __init__(self, settings: Settings, engine: Callable[[], Engine], shared_database: bool):
        self.settings = settings
        self._engine = engine
        self.shared_database = shared_database
        self._plans: dict[int, JobPlan] = {}

    def plan(self, job: Job) -> JobPlan:
        found = self._plans.get(job.id)
        if found is not None:
            return found
        spec = job.spec
        images = image_inputs(job.inputs)
        inputs = JobInputs(prompt=spec.prompt, negative_prompt=spec.negative_prompt, seed=spec.seed,
                           images=tuple((i.key, i.sha256) for i in images))
        originals = Path(job.work_dir) / "originals"
        engine = self._engine()
        identities = engine.model_identities(spec.parameters)
        engine_id = f"{engine.name} {engine.version()}"
        if not self.shared_database:
            # One machine: its device is part of the identity. Several (PostgreSQL): checkpoints
            # are exchanged between cards, so every worker must derive the same fingerprints from
            # engine, version, model files and dtype alone (docs/scaling.md).
            engine_id += f" on {engine.device_name()}"
        plan = JobPlan(job.id, inputs, spec.parameters, tuple((i.key, originals / i.name) for i in images),
                       identities, fingerprint_chain(inputs, spec.parameters, engine_id, identities), engine_id)
        self._plans[job.id] = plan
        return plan

    def forget(self, job_id: int) -> None:
        self._plans.pop(job_id, None)
