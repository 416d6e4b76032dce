"""Choosing the next unit of work: (job, next stage).

Two costs pull against each other: model swaps and the time until each result appears.

- ``auto`` (the default) looks at the models the queued work needs. When they all fit the
  memory budget together, nothing is saved by batching: jobs run in order (priority, then age)
  and each is finished before the next starts, so results arrive one job-time apart. When they
  do not fit, jobs are taken in windows of ``batch_window``: within a window the work is grouped
  by stage and model (text-encode the window's jobs while the text encoder is loaded, then
  sample them while the diffusion model is), so each swap is amortised over the window, and no
  job waits behind more than one window of other work.
- ``stage-major`` runs one stage for every ready job before switching (the whole queue is one
  window): fewest model loads, latest first result.
- ``job-by-job`` finishes one job before starting the next, whatever the budget.

In all of them higher priority goes first, and a job waiting longer than ``max_wait`` goes
before everything else, so a lone job is never starved. The job just worked on stays claimed
between its units (its writes proceed beside the next unit); it goes back to the queue when the
next unit is another job's. Claiming is the database's conditional UPDATE: a unit whose job
another worker took in the meantime is skipped. With several workers (PostgreSQL) a unit is
checked again once claimed: if another worker ran that stage since the queue was read, the job
is given back.

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
from processor.plan import PUBLISH, JobPlan, Planner
from processor.runner import JobRunner, Outcome, Unit
from processor.store import CheckpointStore
from stages import STAGE_NAMES, Engine

log = logging.getLogger(__name__)

STAGE_ORDER = {name: index for index, name in enumerate((*STAGE_NAMES, PUBLISH))}


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

    def __init__(self, planner: Planner):
        self.planner = planner
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
            return KnownJob(job, self.planner.plan(job), None, frozenset(), None)
        except Exception as exc:  # noqa: BLE001 - the runner fails the job with this error
            return KnownJob(job, None, exc, frozenset(), None)


class Scheduler:
    def __init__(self, settings: Settings, db: Database, worker: str, planner: Planner, store: CheckpointStore,
                 runner: JobRunner, engine: Callable[[], Engine], stages: Optional[set[str]] = None):
        self.settings = settings
        self.db = db
        self.worker = worker
        self.planner = planner
        self.store = store
        self.runner = runner
        self._engine = engine
        self.stages = stages  # None: every stage
        self.held: Optional[Job] = None  # the job worked on last, still claimed
        self.last_stage: Optional[str] = None
        self.window: list[int] = []  # the jobs of the current window (``auto`` when models do not fit)
        self.queue = QueueView(planner)

    # What can run ---------------------------------------------------------------------------------

    def ready_units(self, now: datetime) -> list[Unit]:
        """Every unit that could run now: of the claimable jobs and of the job held."""
        queue = self.queue.read(self.db, now)
        recorded = self.queue.recorded | self.store.memo.fingerprints()
        units: list[Unit] = []
        if self.held is not None:
            plan = self.planner.plan(self.held)
            units += self._units(self.held, plan, recorded | self.runner.done_fingerprints(self.held.id, plan))
        for known in queue:
            if known.error is not None:
                units.append(Unit(known.job, "prepare", (), known.error))
                continue
            units += self._units(known.job, known.plan, recorded)
        return units

    def _units(self, job: Job, plan: JobPlan, recorded: set[str]) -> list[Unit]:
        return [Unit(job, stage, self.stage_models(stage, plan)) for stage in plan.next_units(recorded)
                if self.stages is None or stage in self.stages]

    def stage_models(self, stage: str, plan: JobPlan) -> tuple[str, ...]:
        """Model roles the engine loads for ``stage``."""
        if stage == PUBLISH:
            return ()
        return tuple(self._engine().stage_models(stage, plan.params))

    # In which order -------------------------------------------------------------------------------

    def policy(self, units: list[Unit]) -> str:
        """The policy in force: ``auto`` is ``job-by-job`` when every model the ready work needs
        fits the budget together, else ``windowed``."""
        if self.settings.scheduling != "auto":
            return self.settings.scheduling
        return "job-by-job" if self.models_fit(units) else "windowed"

    def models_fit(self, units: list[Unit]) -> bool:
        roles = {role for unit in units for role in unit.models}
        engine = self._engine()
        budget = engine.cache.budget_bytes
        if budget is None or not roles:
            return True
        known = engine.cache.known_sizes()
        estimates: dict[str, int] = {}
        for unit in units:
            missing = [role for role in unit.models if role not in known and role not in estimates]
            if missing:
                estimates.update(engine.model_bytes(unit.job.spec.parameters))
        return sum(known.get(role, estimates.get(role, 0)) for role in roles) <= budget

    def order(self, units: list[Unit], now: datetime) -> list[Unit]:
        """Units best first, by the policy in force."""
        policy = self.policy(units)
        loaded = set(self._engine().cache.loaded()) if units else set()
        held = self.held.id if self.held is not None else None

        def urgency(unit: Unit) -> tuple:
            waited = (now - unit.job.created_at).total_seconds()
            return (0 if waited > self.settings.max_wait else 1, -unit.job.priority)

        def age(unit: Unit) -> tuple:
            return (unit.job.created_at, unit.job.id)

        def by_stage(unit: Unit) -> tuple:
            return (0 if unit.stage == self.last_stage else 1, 0 if set(unit.models) <= loaded else 1,
                    STAGE_ORDER[unit.stage])

        if policy == "job-by-job":
            return sorted(units, key=lambda u: (*urgency(u), 0 if u.job.id == held else 1, *age(u),
                                                STAGE_ORDER[u.stage]))
        if policy == "stage-major":
            return sorted(units, key=lambda u: (*urgency(u), *by_stage(u), *age(u)))
        window = self._window(units, urgency, age)
        return sorted(units, key=lambda u: (0 if u.job.id in window else 1, *urgency(u), *by_stage(u), *age(u)))

    def _window(self, units: list[Unit], urgency: Callable, age: Callable) -> set[int]:
        """The jobs of the current window: kept while any of them has work ready; a new one is
        the first ``batch_window`` jobs in priority and age order. A job more urgent than every
        job of the window (higher priority, or waiting longer than ``max_wait``) joins it."""
        ready = {unit.job.id: unit for unit in units}
        self.window = [job_id for job_id in self.window if job_id in ready]
        if not self.window:
            first = sorted(ready.values(), key=lambda u: (*urgency(u), *age(u)))
            self.window = [unit.job.id for unit in first[:self.settings.batch_window]]
            return set(self.window)
        least_urgent = max(urgency(ready[job_id]) for job_id in self.window)
        for job_id, unit in ready.items():
            if job_id not in self.window and urgency(unit) < least_urgent:
                self.window.append(job_id)
        return set(self.window)

    # Claiming ------------------------------------------------------------------------------------

    def next_unit(self, now: datetime) -> Optional[Unit]:
        """The next unit to run, its job claimed (or still held); None when nothing is due. A held
        job whose next unit is not the best goes back to the queue (after its writes)."""
        for unit in self.order(self.ready_units(now), now):
            if self.held is not None and unit.job.id == self.held.id:
                return unit
            self.release_held()
            if self._claim(unit, now):
                self.runner.heartbeat.hold(unit.job.id)
                self.held = unit.job
                return unit
        self.release_held()
        return None

    def finished(self, unit: Unit, outcome: Outcome) -> None:
        """After a unit ran: its job stays held only when it has more to compute."""
        self.last_stage = unit.stage
        if outcome is not Outcome.COMPUTED:
            self.held = None

    def release_held(self, reason: Optional[str] = None) -> None:
        if self.held is not None:
            self.runner.release(self.held, reason)
            self.held = None

    def _claim(self, unit: Unit, now: datetime) -> bool:
        with self.db.begin() as session:
            if not jobs.claim(session, unit.job.id, self.worker, self.settings.lease_seconds, now):
                return False
            if self.db.shared and not self._still_due(session, unit):
                jobs.release_between_stages(session, unit.job.id, self.worker)
                return False
        return True

    def _still_due(self, session: Session, unit: Unit) -> bool:
        """Whether a unit just claimed still has to run: another worker may have run the stage
        between reading the queue and the claim (its checkpoint is recorded before the job is
        released, so the claiming transaction sees it)."""
        if unit.error is not None or unit.stage == PUBLISH:
            return True
        plan = self.planner.plan(unit.job)
        recorded = checkpoints.existing(session, list(plan.chain.values()))
        return unit.stage in plan.next_units(recorded)

    def next_retry(self) -> Optional[datetime]:
        with self.db.begin() as session:
            return jobs.next_retry_at(session)
