"""Read-only views of the queue for the web pages, the API and the metrics.

Every function only reads; none of them is on the compute loop's path. They are written to stay
fast with a long history: pages select only the columns a table shows, by an index
(``ix_jobs_claim`` for a state, ``ix_jobs_preset``, the primary key for the order), change feeds
read by ``ix_jobs_updated_at``, and the metrics read only what was added since their last look.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, Sequence

from sqlalchemy import JSON, func, null, select, type_coerce
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
        spec = type_coerce(Job.spec, JSON) if stage == "sample" else null()  # plain JSON: no model to build
        stmt = (select(StageRun.duration_s, StageRun.resumed_from_step, spec)
                .join(Job, Job.id == StageRun.job_id)
                .where(StageRun.stage == stage, StageRun.cache_hit.is_(False), StageRun.error.is_(None),
                       StageRun.duration_s.is_not(None))
                .order_by(StageRun.id.desc()).limit(per_stage))
        for duration, resumed, document in session.execute(stmt):
            steps = None
            if isinstance(document, dict):
                steps = max(int((document.get("parameters") or {}).get("steps") or 1) - (resumed or 0), 1)
            samples.append(StageSample(stage, float(duration), steps))
    return samples


# Metrics -------------------------------------------------------------------------------------------

def stage_runs_after(session: Session, after_id: int) -> list[Any]:
    """Stage runs recorded after ``after_id``: id, stage, cache_hit, duration_s, finished_at (a run's
    row is written whole when it ends, and never changed)."""
    stmt = (select(StageRun.id, StageRun.stage, StageRun.cache_hit, StageRun.duration_s, StageRun.finished_at)
            .where(StageRun.id > after_id).order_by(StageRun.id))
    return list(session.execute(stmt))


def jobs_started_after(session: Session, since: Optional[datetime]) -> list[Any]:
    """created_at and started_at of the jobs that started after ``since`` (all: None). A job's
    ``started_at`` is set once, when it is first claimed, with its ``updated_at``."""
    stmt = select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None))
    if since is not None:
        stmt = stmt.where(Job.updated_at > since, Job.started_at > since)
    return list(session.execute(stmt))


def job_events_after(session: Session, after_id: int, kinds: Sequence[str]) -> list[Any]:
    """id, kind and time of the job events of these kinds recorded after ``after_id``."""
    stmt = (select(Event.id, Event.kind, Event.at)
            .where(Event.id > after_id, Event.kind.in_(list(kinds)), Event.job_id.is_not(None)).order_by(Event.id))
    return list(session.execute(stmt))


def oldest_queued_at(session: Session) -> Optional[datetime]:
    return session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value))


def failed_by_kind(session: Session) -> dict[str, int]:
    """Jobs now failed, by the kind of their error (permanent, transient, crash)."""
    stmt = (select(Job.error_kind, func.count()).where(Job.state == JobState.FAILED.value)
            .group_by(Job.error_kind))
    return {kind or "unknown": count for kind, count in session.execute(stmt)}
