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
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Optional

from sqlalchemy.orm import Session

from config import Settings
from db import Database, Job, checkpoints, jobs
from processor.runner import PUBLISH, JobPlan, JobRunner, Unit
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


@dataclass
class KnownJob:
    """A claimable job as last read: the row, its plan (or why it has none), the fingerprints of
    its chain that had a checkpoint, and the row's ``updated_at`` then."""

    job: Job
    plan: Optional[JobPlan]
    error: Optional[Exception]
    recorded: frozenset[str]
    version: Optional[datetime]  # None: not read yet


class QueueView:
    """The claimable jobs and their checkpoints, read again only where something changed.

    Each look reads the ids and ``updated_at`` of the claimable jobs; only a job that is new to
    the view, or whose row changed since (every claim, release and progress write changes it),
    is read again with its checkpoints. So a unit costs the same with 1,000 jobs queued as with
    ten. The recorded fingerprints of all jobs are pooled: a checkpoint one job records is seen
    by every job that shares it (a seed sweep). A stale view costs at most a needless claim: the
    runner finds and uses a checkpoint recorded meanwhile, or computes one that went missing.
    """

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self._known: dict[int, KnownJob] = {}
        self.recorded: set[str] = set()

    def read(self, db: Database, now: datetime) -> list[KnownJob]:
        """The claimable jobs, best first (priority, then age)."""
        with db.begin() as session:
            current = {row.id: row.updated_at for row in jobs.claimable(session, now)}
            self._known = {job_id: known for job_id, known in self._known.items() if job_id in current}
            for job in jobs.jobs_by_id(session, [job_id for job_id in current if job_id not in self._known]):
                self._known[job.id] = self._planned(job)
            changed = [known for job_id, known in self._known.items() if known.version != current[job_id]]
            found = checkpoints.existing(session, [fp for known in changed if known.plan
                                                   for fp in known.plan.chain.values()])
        for known in changed:
            known.version = current[known.job.id]
            known.recorded = frozenset(fp for fp in known.plan.chain.values() if fp in found) if known.plan else frozenset()
        self.recorded = set().union(*(known.recorded for known in self._known.values()))
        return [self._known[job_id] for job_id in current if job_id in self._known]

    def _planned(self, job: Job) -> KnownJob:
        """A job new to the view (its checkpoints are read with the changed ones)."""
        try:
            return KnownJob(job, self.runner.plan(job), None, frozenset(), None)
        except Exception as exc:  # noqa: BLE001 - the runner fails the job with this error
            return KnownJob(job, None, exc, frozenset(), None)


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
        self.queue = QueueView(runner)

    def ready_units(self, now: datetime) -> list[Unit]:
        """Every unit that could run now."""
        queue = self.queue.read(self.db, now)
        units: list[Unit] = []
        for known in queue:
            if known.error is not None:
                units.append(Unit(known.job, "prepare", (), known.error))
                continue
            for stage in self.runner.next_stages(known.plan, self.queue.recorded):
                if self.stages is None or stage in self.stages:
                    units.append(Unit(known.job, stage, self.runner.stage_models(stage)))
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
        """Claim and return the next unit to run, or None when nothing is due. The claim, the
        check that the unit is still due and the opening of its run record are one transaction."""
        for unit in self.order(self.ready_units(now), now):
            with self.db.begin() as session:
                if not jobs.claim(session, unit.job.id, self.worker, self.settings.lease_seconds, now):
                    continue
                if self.db.shared and not self._still_due(session, unit):
                    jobs.release_between_stages(session, unit.job.id, self.worker)
                    continue
                self.runner.open_unit(session, unit)
            self.last_stage, self.last_job = unit.stage, unit.job.id
            return unit
        return None

    def _still_due(self, session: Session, unit: Unit) -> bool:
        """Whether a unit just claimed still has to run: another worker may have run the stage
        between reading the queue and the claim (its checkpoint is recorded before the job is
        released, so the claiming transaction sees it)."""
        if unit.error is not None or unit.stage == PUBLISH:
            return True
        plan = self.runner.plan(unit.job)
        recorded = checkpoints.existing(session, list(plan.chain.values()))
        return unit.stage in self.runner.next_stages(plan, recorded)

    def next_retry(self) -> Optional[datetime]:
        with self.db.begin() as session:
            return jobs.next_retry_at(session)
