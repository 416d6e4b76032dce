"""Read-only views of the queue for the web pages, the API and the metrics.

Every function only reads; none of them is on the compute loop's path. They are written to stay
fast with a long history: pages select only the columns a table shows, by an index
(``ix_jobs_claim`` for a state, ``ix_jobs_preset``, the primary key for the order), change feeds
read by ``ix_jobs_updated_at``, and the metrics' histograms are counted by the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, Sequence

from sqlalchemy import Float, case, cast, func, select
from sqlalchemy.orm import Session

from db.schema import Event, Job, JobState, StageRun

# The columns of a job that a list shows (not its spec, inputs or result documents).
LIST_COLUMNS = (Job.id, Job.name, Job.state, Job.stage, Job.step, Job.steps_total, Job.preset, Job.priority,
                Job.attempts, Job.error, Job.error_kind, Job.next_attempt_at, Job.cancel_requested,
                Job.created_at, Job.updated_at, Job.started_at, Job.finished_at, Job.output_name)


def _filtered(stmt, states: Optional[Sequence[str]], preset: Optional[str]):
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    if preset:
        stmt = stmt.where(Job.preset == preset)
    return stmt


def job_page(session: Session, states: Optional[Sequence[str]] = None, preset: Optional[str] = None,
             limit: int = 50, offset: int = 0) -> list[Any]:
    """One page of jobs, newest first: rows with the attributes of ``LIST_COLUMNS``."""
    stmt = _filtered(select(*LIST_COLUMNS), states, preset).order_by(Job.id.desc()).limit(limit).offset(offset)
    return list(session.execute(stmt))


def job_count(session: Session, states: Optional[Sequence[str]] = None, preset: Optional[str] = None) -> int:
    return int(session.scalar(_filtered(select(func.count()).select_from(Job), states, preset)) or 0)


def list_rows(session: Session, ids: Sequence[int]) -> list[Any]:
    """The list rows of these jobs."""
    if not ids:
        return []
    return list(session.execute(select(*LIST_COLUMNS).where(Job.id.in_(list(ids)))))


def presets(session: Session) -> list[str]:
    """The preset folders jobs came from."""
    return sorted(p for p in session.scalars(select(Job.preset).where(Job.preset.is_not(None)).distinct()))


def changed_since(session: Session, since: datetime, limit: int = 500) -> list[tuple[int, datetime]]:
    """``(id, updated_at)`` of the jobs changed after ``since``, oldest change first."""
    stmt = (select(Job.id, Job.updated_at).where(Job.updated_at > since)
            .order_by(Job.updated_at, Job.id).limit(limit))
    return [(row.id, row.updated_at) for row in session.execute(stmt)]


def newest_change(session: Session) -> Optional[datetime]:
    return session.scalar(select(func.max(Job.updated_at)))


def recent_alarms(session: Session, since: datetime, limit: int = 20) -> list[Event]:
    """Alarm events (errors and their all-clear warnings) since ``since``, newest first."""
    stmt = (select(Event).where(Event.job_id.is_(None), Event.kind == "alarm", Event.at >= since)
            .order_by(Event.id.desc()).limit(limit))
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class StageSample:
    """One recent computation of a stage: how long it took, and for how many steps."""

    stage: str
    seconds: float
    steps: Optional[int]  # steps computed (a stepped stage), else None


def recent_stage_samples(session: Session, per_stage: int = 50) -> list[StageSample]:
    """The latest successful computations (not reuses) of each stage, for estimates."""
    samples = []
    stages = list(session.scalars(select(StageRun.stage).distinct()))
    for stage in stages:
        stmt = (select(StageRun.duration_s, StageRun.resumed_from_step, Job.spec, Job.steps_total)
                .join(Job, Job.id == StageRun.job_id)
                .where(StageRun.stage == stage, StageRun.cache_hit.is_(False), StageRun.error.is_(None),
                       StageRun.duration_s.is_not(None))
                .order_by(StageRun.id.desc()).limit(per_stage))
        for duration, resumed, spec, _ in session.execute(stmt):
            steps = None
            if stage == "sample" and spec is not None:
                steps = max(spec.parameters.steps - (resumed or 0), 1)
            samples.append(StageSample(stage, float(duration), steps))
    return samples


# Metrics -------------------------------------------------------------------------------------------

@dataclass
class Histogram:
    """Cumulative bucket counts (one per upper bound), the count and the sum."""

    buckets: list[int]
    count: int
    total: float


def _histograms(session: Session, value: Any, bounds: Sequence[float], where: Sequence[Any],
                group: Optional[Any] = None) -> dict[Any, Histogram]:
    columns = [func.sum(case((value <= bound, 1), else_=0)) for bound in bounds]
    stmt = select(*([group] if group is not None else []), func.count(), func.sum(value), *columns).where(*where)
    if group is not None:
        stmt = stmt.group_by(group)
    found = {}
    for row in session.execute(stmt):
        values = list(row)
        key = values.pop(0) if group is not None else None
        count, total = int(values[0] or 0), float(values[1] or 0.0)
        found[key] = Histogram([int(v or 0) for v in values[2:]], count, total)
    return found


def stage_duration_histograms(session: Session, bounds: Sequence[float]) -> dict[str, Histogram]:
    """Seconds per computed stage run (reuses left out), by stage."""
    return _histograms(session, StageRun.duration_s, bounds,
                       [StageRun.cache_hit.is_(False), StageRun.duration_s.is_not(None)], StageRun.stage)


def _seconds_between(session: Session, start: Any, end: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return cast((func.julianday(end) - func.julianday(start)) * 86400.0, Float)


def wait_histogram(session: Session, bounds: Sequence[float]) -> Histogram:
    """Seconds from being queued to starting to run, over every job that started."""
    wait = _seconds_between(session, Job.created_at, Job.started_at)
    return _histograms(session, wait, bounds, [Job.started_at.is_not(None)]).get(None, Histogram([0] * len(bounds), 0, 0.0))


def oldest_queued_at(session: Session) -> Optional[datetime]:
    return session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value))


def stage_run_counts(session: Session) -> dict[tuple[str, bool], int]:
    """Stage runs by (stage, reused from a checkpoint)."""
    stmt = select(StageRun.stage, StageRun.cache_hit, func.count()).group_by(StageRun.stage, StageRun.cache_hit)
    return {(stage, bool(hit)): count for stage, hit, count in session.execute(stmt)}


def failed_by_kind(session: Session) -> dict[str, int]:
    """Jobs now failed, by the kind of their error (permanent, transient, crash)."""
    stmt = (select(Job.error_kind, func.count()).where(Job.state == JobState.FAILED.value)
            .group_by(Job.error_kind))
    return {kind or "unknown": count for kind, count in session.execute(stmt)}


def event_counts(session: Session, kinds: Sequence[str]) -> dict[str, int]:
    """How many events of each kind were ever recorded about jobs."""
    stmt = (select(Event.kind, func.count()).where(Event.kind.in_(list(kinds)), Event.job_id.is_not(None))
            .group_by(Event.kind))
    found = {kind: 0 for kind in kinds}
    found.update({kind: count for kind, count in session.execute(stmt)})
    return found
