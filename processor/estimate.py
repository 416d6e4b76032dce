"""When will it start, when will it be done: estimates from measured stage times.

Each computed stage run is a measurement: its seconds (without model loading) per unit of work,
where the unit is the job's megapixels for most stages and megapixels times steps for a stepped
stage (sampling), kept per stage and per device (the device string names the engine's device and
dtype, so a GPU and a CPU, or two engines, are not mixed). A job's remaining time is the sum over its remaining
stages of the median recent rate times its size; a running stepped stage counts only its steps
left. The queue is then laid out in the order the scheduler takes it (priority, then age),
after the jobs running now, which gives each queued job an estimated start and finish. That is
the order jobs finish in when the models fit the budget (``scheduling = "auto"``); when work is
grouped by model, jobs finish later than estimated within their window and the window's last on
time; model loads are not counted.

Before anything was measured on this device there is no estimate (``None``): no number is shown
rather than a made-up one.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

from sqlalchemy import select

from config import StageParameters
from db import Database, Job, JobState, StageRun
from db.jobs import FINISHING
from stages import BY_NAME, STAGES

RECENT_RUNS = 400  # the measurements an estimate is drawn from, newest first


@dataclass(frozen=True)
class Estimate:
    start: datetime  # naive UTC
    finish: datetime


def work_units(stage: str, params: StageParameters) -> float:
    """The size of a stage of a job: megapixels, times steps for a stepped stage."""
    pixels = params.width * params.height / 1e6 if params.width and params.height else params.megapixels * 1.048576
    steps = BY_NAME[stage].steps_for(params) if stage in BY_NAME else None
    return max(pixels, 0.01) * (steps or 1)


class Rates:
    """Median seconds per unit of work, per stage and device, from the recent runs."""

    def __init__(self, by_stage: dict[tuple[str, str], float]):
        self.by_stage = by_stage

    @classmethod
    def measured(cls, db: Database) -> "Rates":
        samples: dict[tuple[str, str], list[float]] = defaultdict(list)
        stmt = (select(StageRun.stage, StageRun.device, StageRun.duration_s, StageRun.load_s,
                       StageRun.resumed_from_step, Job.spec)
                .join(Job, Job.id == StageRun.job_id)
                .where(StageRun.cache_hit.is_(False), StageRun.error.is_(None), StageRun.duration_s.is_not(None))
                .order_by(StageRun.id.desc()).limit(RECENT_RUNS))
        with db.begin() as session:
            for stage, device, seconds, loading, resumed, spec in session.execute(stmt):
                if stage not in BY_NAME or resumed:  # a resumed run did only part of the work
                    continue
                computing = max(seconds - (loading or 0.0), 0.0)  # model loads are not the job's size
                samples[(stage, device or "")].append(computing / work_units(stage, spec.parameters))
        return cls({key: statistics.median(values) for key, values in samples.items()})

    def device(self) -> Optional[str]:
        """The device measured most recently for every stage (the one estimates are made for)."""
        devices = {device for _, device in self.by_stage}
        complete = [d for d in devices if all((stage.name, d) in self.by_stage for stage in STAGES)]
        return complete[0] if len(complete) == 1 else (max(complete) if complete else None)

    def seconds(self, device: str, params: StageParameters, stages: list[str],
                steps_done: int = 0) -> Optional[float]:
        """Seconds for ``stages`` of a job; ``steps_done`` of the first one (stepped) already done."""
        total = 0.0
        for index, stage in enumerate(stages):
            rate = self.by_stage.get((stage, device))
            if rate is None:
                return None
            units = work_units(stage, params)
            steps = BY_NAME[stage].steps_for(params)
            if index == 0 and steps and steps_done:
                units *= max(steps - steps_done, 0) / steps
            total += rate * units
        return total


def remaining_stages(job: Job) -> list[str]:
    """The stages a job has still to run: all for a queued job that started none, else from the
    one it is in (a job between stages is taken to restart its current one)."""
    names = [stage.name for stage in STAGES]
    if job.stage == FINISHING:  # its results are being written: no compute left
        return []
    if job.stage in names:
        return names[names.index(job.stage):]
    return names


def queue_estimates(db: Database, now: datetime, rates: Optional[Rates] = None) -> dict[int, Estimate]:
    """Estimated start and finish of every running and queued job (none before measurements)."""
    rates = rates or Rates.measured(db)
    device = rates.device()
    if device is None:
        return {}
    with db.begin() as session:
        running = list(session.scalars(select(Job).where(Job.state == JobState.RUNNING.value).order_by(Job.id)))
        queued = list(session.scalars(select(Job).where(Job.state == JobState.QUEUED.value)
                                      .order_by(Job.priority.desc(), Job.created_at, Job.id)))
    estimates: dict[int, Estimate] = {}
    clock = now
    for job in running:
        seconds = rates.seconds(device, job.spec.parameters, remaining_stages(job), job.step or 0)
        if seconds is None:
            return {}
        clock += timedelta(seconds=seconds)
        estimates[job.id] = Estimate(now, clock)
    for job in queued:
        start = max(clock, job.next_attempt_at or clock)
        seconds = rates.seconds(device, job.spec.parameters, remaining_stages(job))
        if seconds is None:
            return estimates
        clock = start + timedelta(seconds=seconds)
        estimates[job.id] = Estimate(start, clock)
    return estimates
