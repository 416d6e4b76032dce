"""The manifest published beside every output: what was asked, what ran, how and where."""

from __future__ import annotations

import json
import platform
from datetime import datetime
from typing import Any

from config import IMAGE_KEYS, JobSpec, Settings
from db import Job, StageRun, utcnow
from processor.plan import JobPlan
from stages import Engine


def build_manifest(settings: Settings, job: Job, plan: JobPlan, engine: Engine, runs: list[StageRun],
                   attempts: int, crashes: int, model_loads: dict[str, int],
                   engine_metadata: dict[str, str]) -> dict[str, Any]:
    """The manifest; ``engine_metadata`` is the engine's text for the image (``engine_text``)."""
    spec = job.spec
    published_at = utcnow()
    return {
        "job": {"id": job.id, "name": job.name, "source": job.source,
                "created_at": job.created_at.isoformat(timespec="seconds") + "Z",
                "attempts": attempts, "crashes": crashes},
        "job_file": {k: v for k, v in spec.job_file.items() if k != "notify"},  # its URLs may hold secrets
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.seed,
        "seed_source": spec.seed_source,
        "parameters": plan.params.model_dump(mode="json"),
        "inputs": [i.model_dump(mode="json") for i in job.inputs],
        "engine": {"name": engine.name, "version": engine.version(), "device": engine.device_name(),
                   "threads": settings.effective_threads},
        "models": plan.identities,
        "fingerprints": plan.chain,
        "stages": [stage_row(run) for run in runs],
        "model_loads_for_this_job": model_loads,
        "timing": timing(job, published_at),
        "model_cache": engine.cache.stats.as_dict(),
        "host": platform.node(),
        "published_at": published_at.isoformat(timespec="seconds") + "Z",
        # What the image's own text carries for the engine (ComfyUI: its "prompt" and "workflow").
        "engine_metadata": {key: _parsed(text) for key, text in engine_metadata.items()},
    }


def timing(job: Job, published_at: datetime) -> dict[str, Any]:
    """When the job was queued, started and published, and what was estimated when it was queued."""
    def stamp(value):
        return value.isoformat(timespec="seconds") + "Z" if value is not None else None

    return {"queued_at": stamp(job.created_at), "started_at": stamp(job.started_at),
            "published_at": stamp(published_at), "estimated_start_when_queued": stamp(job.estimated_start),
            "estimated_finish_when_queued": stamp(job.estimated_finish)}


def engine_text(engine: Engine, spec: JobSpec) -> dict[str, str]:
    """The engine's text for the published image of this job (e.g. ComfyUI's graph as JSON)."""
    images = [spec.images[key] for key in IMAGE_KEYS if key in spec.images]
    return engine.output_metadata(spec.prompt, spec.negative_prompt, spec.seed, images, spec.parameters)


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def stage_row(run: StageRun) -> dict[str, Any]:
    return {"stage": run.stage, "fingerprint": run.fingerprint, "cache_hit": run.cache_hit,
            "duration_s": round(run.duration_s or 0.0, 4), "resumed_from_step": run.resumed_from_step,
            "device": run.device, "worker": run.worker, "checkpoint_sha256": run.checkpoint_sha256,
            "error": run.error, "at": run.started_at.isoformat(timespec="seconds") + "Z"}
