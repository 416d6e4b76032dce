"""Choosing the next unit of work: (job, next stage).

``stage-major`` (the default) runs one stage for every ready job before switching, preferring
the stage that just ran and stages whose models are loaded: text-encode every queued job while
the text encoder is in memory, then sample them all while the diffusion model is. On a GPU that
cannot hold every model this replaces two model swaps per job by two per batch. ``job-by-job``
finishes one job before starting the next (for comparison). In both, higher priority goes
first, and a job waiting longer than ``max_wait`` goes before everything else, so a lone job is
never starved. Claiming is the database's conditional UPDATE: a unit whose job another worker
took in the meantime is skipped. With several workers (PostgreSQL) a unit is checked again once
claimed: if another worker ran that stage since the queue was read, the job is given back.

A worker for some stages (``run.py worker --stages``) claims only their units; ``prepare``
goes with the encoders that read it, ``publish`` with ``decode`` (``claimed_stages``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Callable, Iterable, Optional

from config import Settings
from db import Database, checkpoints, jobs
from processor.runner import PUBLISH, JobRunner, Unit
from stages import STAGE_NAMES

log = logging.getLogger(__name__)

# encode_text before encode_latent: the VAE is then the most recently used model when the
# diffusion model is loaded, so a budget that holds the diffusion model and the VAE evicts the
# text encoder and keeps the VAE for decode.
STAGE_ORDER = {name: index for index, name in enumerate(
    ("prepare", "encode_text", "encode_latent", "sample", "decode", PUBLISH))}


def claimed_stages(names: Iterable[str]) -> set[str]:
    """The units a worker for the stages ``names`` claims: those stages, ``prepare`` with either
    encoder (it needs no model and only they read it), ``publish`` with ``decode`` (the unit
    that publishes a job whose decode checkpoint exists). ValueError naming a wrong name."""
    wanted = {name.strip() for name in names if name.strip()}
    unknown = sorted(wanted - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(STAGE_NAMES)}")
    if not wanted:
        raise ValueError(f"no stage given; the stages are {', '.join(STAGE_NAMES)}")
    if wanted & {"encode_latent", "encode_text"}:
        wanted.add("prepare")
    if "decode" in wanted:
        wanted.add(PUBLISH)
    return wanted


class Scheduler:
    def __init__(self, settings: Settings, db: Database, worker: str, runner: JobRunner,
                 loaded_models: Callable[[], Iterable[str]], stages: Optional[set[str]] = None):
        self.settings = settings
        self.db = db
        self.worker = worker
        self.runner = runner
        self.loaded_models = loaded_models
        self.stages = stages  # None: every stage
        self.last_stage: Optional[str] = None
        self.last_job: Optional[int] = None

    def ready_units(self, now: datetime) -> list[Unit]:
        """Every unit that could run now."""
        with self.db.begin() as session:
            queued = jobs.claimable(session, now)
        units: list[Unit] = []
        plans = {}
        for job in queued:
            try:
                plans[job.id] = self.runner.plan(job)
            except Exception as exc:  # noqa: BLE001 - the runner fails the job with this error
                units.append(Unit(job, "prepare", (), exc))
        fingerprints = [fp for plan in plans.values() for fp in plan.chain.values()]
        with self.db.begin() as session:
            recorded = checkpoints.existing(session, fingerprints)
        for job in queued:
            plan = plans.get(job.id)
            if plan is None:
                continue
            for stage in self.runner.next_stages(plan, recorded):
                if self.stages is None or stage in self.stages:
                    units.append(Unit(job, stage, self.runner.stage_models(stage)))
        return units

    def order(self, units: list[Unit], now: datetime) -> list[Unit]:
        """Units best first, by the configured policy."""
        loaded = set(self.loaded_models())

        def starving(unit: Unit) -> int:
            waited = (now - unit.job.created_at).total_seconds()
            return 0 if waited > self.settings.max_wait else 1

        def stage_major(unit: Unit):
            affinity = 0 if set(unit.models) <= loaded else 1
            same_stage = 0 if unit.stage == self.last_stage else 1
            return (starving(unit), -unit.job.priority, same_stage, affinity, STAGE_ORDER[unit.stage],
                    unit.job.created_at, unit.job.id)

        def job_by_job(unit: Unit):
            same_job = 0 if unit.job.id == self.last_job else 1
            return (starving(unit), -unit.job.priority, same_job, unit.job.created_at, unit.job.id,
                    STAGE_ORDER[unit.stage])

        key = stage_major if self.settings.scheduling == "stage-major" else job_by_job
        return sorted(units, key=key)

    def claim_next(self, now: datetime) -> Optional[Unit]:
        """Claim and return the next unit to run, or None when nothing is due."""
        for unit in self.order(self.ready_units(now), now):
            with self.db.begin() as session:
                if not jobs.claim(session, unit.job.id, self.worker, self.settings.lease_seconds, now):
                    continue
            if self.db.shared and not self._still_due(unit):
                with self.db.begin() as session:
                    jobs.release_between_stages(session, unit.job.id, self.worker)
                continue
            self.last_stage, self.last_job = unit.stage, unit.job.id
            return unit
        return None

    def _still_due(self, unit: Unit) -> bool:
        """Whether a claimed unit still has to run: another worker may have run the stage between
        reading the queue and the claim (its checkpoint is recorded before the job is released,
        so a claim that succeeds sees it)."""
        if unit.error is not None or unit.stage == PUBLISH:
            return True
        plan = self.runner.plan(unit.job)
        with self.db.begin() as session:
            recorded = checkpoints.existing(session, list(plan.chain.values()))
        return unit.stage in self.runner.next_stages(plan, recorded)

    def next_retry(self) -> Optional[datetime]:
        with self.db.begin() as session:
            return jobs.next_retry_at(session)
