"""Every job state transition, in one place.

    waiting -> queued -> running -> done | failed | cancelled
                 ^          |
                 +----------+  (transient error with attempts left, crash, released at shutdown)

Functions take a session; the caller owns the transaction (``with db.begin() as session``).
Claiming is one conditional UPDATE that succeeds for exactly one claimer; on PostgreSQL the
row is taken with ``FOR UPDATE SKIP LOCKED`` inside it, so that concurrent claimers on other
machines never wait for each other. Every change to a running job is conditional on its
claimer (``claimed_by``): a worker whose lease was taken over changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional, Sequence

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from config.spec import InputFile, JobSpec, Published
from db.notifications import enqueue as notify
from db.schema import FINAL_STATES, Event, Job, JobState, utcnow

# The statements of a unit of work, built once (building one costs more than running it, and a
# daemon runs them a dozen times a job). They name the table, not the mapped class: no loaded
# object needs updating after them. Every UPDATE still sets ``updated_at`` (its ``onupdate``).
_jobs = Job.__table__
_QUEUED, _RUNNING = JobState.QUEUED.value, JobState.RUNNING.value
_CLAIMABLE = (select(_jobs.c.id, _jobs.c.updated_at)
              .where(_jobs.c.state == _QUEUED,
                     or_(_jobs.c.next_attempt_at.is_(None), _jobs.c.next_attempt_at <= bindparam("now")))
              .order_by(_jobs.c.priority.desc(), _jobs.c.created_at, _jobs.c.id))
_CLAIM_VALUES = dict(state=_RUNNING, claimed_by=bindparam("worker"), lease_until=bindparam("until"),
                     started_at=func.coalesce(_jobs.c.started_at, bindparam("now")), updated_at=bindparam("now"))
_CLAIM = {
    "sqlite": update(_jobs).where(_jobs.c.id == bindparam("job"), _jobs.c.state == _QUEUED).values(**_CLAIM_VALUES),
    "postgresql": update(_jobs).where(
        _jobs.c.id == (select(_jobs.c.id).where(_jobs.c.id == bindparam("job"), _jobs.c.state == _QUEUED)
                       .with_for_update(skip_locked=True).scalar_subquery()),
        _jobs.c.state == _QUEUED).values(**_CLAIM_VALUES),
}
_HELD = (_jobs.c.id == bindparam("job"), _jobs.c.claimed_by == bindparam("worker"), _jobs.c.state == _RUNNING)
_RENEW = update(_jobs).where(*_HELD).values(lease_until=bindparam("until"), updated_at=bindparam("now"))
_RENEW_WITH_PROGRESS = update(_jobs).where(*_HELD).values(
    lease_until=bindparam("until"), updated_at=bindparam("now"), stage=bindparam("stage_"),
    step=bindparam("step_"), steps_total=bindparam("steps_total_"))
_RELEASE = update(_jobs).where(*_HELD).values(state=_QUEUED, claimed_by=None, lease_until=None, step=None)
# The stage shown by a job whose results are being written while its worker computes another.
FINISHING = "finishing"
_FINISHING = update(_jobs).where(_jobs.c.claimed_by == bindparam("worker"), _jobs.c.state == _RUNNING,
                                 _jobs.c.id != bindparam("job")).values(stage=FINISHING, step=None,
                                                                         updated_at=bindparam("now"))


class TransitionError(ValueError):
    """The job is not in a state that allows this change."""


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def add_event(session: Session, job_id: Optional[int], kind: str, message: str, level: str = "info") -> None:
    session.add(Event(job_id=job_id, kind=kind, message=message, level=level))
    if kind == "alarm" and level == "error":
        notify(session, "alarm", "qie-hotfolder alarm", message, job_id, {"message": message})


def _notify_job(session: Session, job_id: int, event: str, message: str, **details) -> None:
    """A notification about a job that just finished, in the transaction that finished it."""
    name, preset = session.execute(select(Job.name, Job.preset).where(Job.id == job_id)).one()
    payload = {"job": {"id": job_id, "name": name, "preset": preset, "state": event}, **details}
    notify(session, event, f"qie-hotfolder: job {job_id} ({name}) {event}", message, job_id, payload)


def create_job(session: Session, *, name: str, source: str, ingest_key: str, spec: JobSpec,
               inputs: list[InputFile], work_dir: str, priority: int = 0, preset: Optional[str] = None) -> Job:
    job = Job(name=name[:255], source=source, ingest_key=ingest_key, spec=spec, inputs=inputs,
              work_dir=work_dir, priority=priority, preset=preset, state=JobState.QUEUED.value,
              inbox_cleared=False, attempts=0, crashes=0, cancel_requested=False)
    session.add(job)
    session.flush()
    add_event(session, job.id, "queued", f"ingested from {source}")
    return job


def record_estimates(session: Session, estimates: dict[int, tuple[datetime, datetime]]) -> None:
    """Store, for jobs that have none yet, the start and finish estimated when they were queued."""
    for job_id, (start, finish) in estimates.items():
        session.execute(update(Job).where(Job.id == job_id, Job.estimated_finish.is_(None))
                        .values(estimated_start=start, estimated_finish=finish))


def find_uncleared_ingest(session: Session, ingest_key: str) -> Optional[Job]:
    """A job made from this very drop whose inbox files were not yet removed (a crash in between)."""
    stmt = select(Job).where(Job.ingest_key == ingest_key, Job.inbox_cleared.is_(False))
    return session.scalars(stmt).first()


def ingest_work_dirs(session: Session, ingest_key: str) -> set[str]:
    """The names of the work folders of the jobs made from drops with this ingest key."""
    rows = session.scalars(select(Job.work_dir).where(Job.ingest_key == ingest_key).distinct())
    return {work_dir.rstrip("/").rsplit("/", 1)[-1] for work_dir in rows}


def mark_inbox_cleared(session: Session, ingest_key: str) -> None:
    """Every job made from this drop: its files are out of the inbox."""
    session.execute(update(Job).where(Job.ingest_key == ingest_key).values(inbox_cleared=True))


def get_job(session: Session, job_id: int) -> Optional[Job]:
    return session.get(Job, job_id)


def list_jobs(session: Session, states: Optional[Sequence[str]] = None, limit: int = 200) -> list[Job]:
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    return list(session.scalars(stmt))


def claimable(session: Session, now: datetime) -> list:
    """``(id, updated_at)`` of the queued jobs whose retry time has come, best first (priority,
    then age). Every change to a job row sets its ``updated_at``, so a reader that keeps what it
    read about a job knows from it when to read the job again."""
    return list(session.execute(_CLAIMABLE, {"now": now}))


def jobs_by_id(session: Session, ids: Sequence[int]) -> list[Job]:
    found: list[Job] = []
    for start in range(0, len(ids), 500):
        found.extend(session.scalars(select(Job).where(Job.id.in_(list(ids[start:start + 500])))))
    return found


def next_retry_at(session: Session) -> Optional[datetime]:
    stmt = (select(Job.next_attempt_at)
            .where(Job.state == JobState.QUEUED.value, Job.next_attempt_at.is_not(None))
            .order_by(Job.next_attempt_at).limit(1))
    return session.scalars(stmt).first()


def claim(session: Session, job_id: int, worker: str, lease_seconds: float, now: datetime) -> bool:
    """Take a queued job for one unit of work. True only for the claimer whose UPDATE changed the row.

    SQLite: ``UPDATE jobs ... WHERE id = :id AND state = 'queued'`` (its writers are serialised).
    PostgreSQL: ``UPDATE jobs ... WHERE id = (SELECT id FROM jobs WHERE id = :id AND state =
    'queued' FOR UPDATE SKIP LOCKED) AND state = 'queued'``: a row another claimer is taking is
    skipped at once instead of waited for, and a row it took is no longer queued.
    """
    claim_ = _CLAIM["postgresql" if _dialect(session) == "postgresql" else "sqlite"]
    result = session.execute(claim_, {"job": job_id, "worker": worker, "now": now,
                                      "until": now + timedelta(seconds=lease_seconds)})
    if result.rowcount != 1:
        return False
    # The worker's other running jobs are only being finished (written, published) from now on:
    # if the process dies, the crash is this job's, not theirs.
    session.execute(_FINISHING, {"worker": worker, "job": job_id, "now": now})
    return True


def renew_lease(session: Session, job_id: int, worker: str, lease_seconds: float, now: datetime,
                stage: Optional[str] = None, step: Optional[int] = None,
                steps_total: Optional[int] = None) -> bool:
    """Extend the lease and record progress; False when the job is no longer ours."""
    values = {"job": job_id, "worker": worker, "now": now, "until": now + timedelta(seconds=lease_seconds)}
    if stage is None:
        return session.execute(_RENEW, values).rowcount == 1
    values.update(stage_=stage, step_=step, steps_total_=steps_total)
    return session.execute(_RENEW_WITH_PROGRESS, values).rowcount == 1


def holds(session: Session, job_id: int, worker: str) -> bool:
    """Whether ``worker`` still holds the job (it is running and claimed by it)."""
    stmt = select(Job.id).where(Job.id == job_id, Job.claimed_by == worker, Job.state == JobState.RUNNING.value)
    return session.scalar(stmt) is not None


def unfinished_due(session: Session, now: datetime) -> int:
    """Jobs still to be worked on now: running, or queued with no retry time in the future."""
    stmt = select(func.count()).select_from(Job).where(or_(
        Job.state == JobState.RUNNING.value,
        (Job.state == JobState.QUEUED.value) & or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)))
    return int(session.scalar(stmt) or 0)


def cancel_requested(session: Session, job_id: int) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def reserve_output_name(session: Session, job_id: int, output_name: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(output_name=output_name))


def reserved_output_names(session: Session, job_id: int, preset: Optional[str]) -> set[str]:
    """Output names other jobs publishing into the same outbox folder have reserved."""
    stmt = select(Job.output_name).where(Job.output_name.is_not(None), Job.id != job_id,
                                         Job.preset.is_(None) if preset is None else Job.preset == preset)
    return set(session.scalars(stmt))


def _finish(session: Session, job_id: int, worker: str, state: JobState, **values) -> None:
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.claimed_by == worker, Job.state == JobState.RUNNING.value)
        .values(state=state.value, claimed_by=None, lease_until=None, finished_at=utcnow(), **values))
    if result.rowcount != 1:
        raise TransitionError(f"job {job_id} is no longer running for {worker}")


def mark_done(session: Session, job_id: int, worker: str, result: Published) -> None:
    _finish(session, job_id, worker, JobState.DONE, result=result, stage=None, step=None, error=None,
            error_kind=None)
    add_event(session, job_id, "done", f"published {result.image}")
    _notify_job(session, job_id, "done", f"published {result.image}", output=result.image, manifest=result.manifest)


def mark_failed(session: Session, job_id: int, worker: str, error: str, kind: str) -> None:
    _finish(session, job_id, worker, JobState.FAILED, error=error, error_kind=kind, attempts=Job.attempts + 1)
    add_event(session, job_id, "failed", error, level="error")
    _notify_job(session, job_id, "failed", error, error=error, kind=kind)


def mark_cancelled(session: Session, job_id: int, worker: str) -> None:
    _finish(session, job_id, worker, JobState.CANCELLED, error="cancelled on request")
    add_event(session, job_id, "cancelled", "cancelled while running")


def schedule_retry(session: Session, job_id: int, worker: str, error: str, at: datetime) -> None:
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.claimed_by == worker, Job.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, claimed_by=None, lease_until=None, next_attempt_at=at,
                error=error, error_kind="transient", attempts=Job.attempts + 1))
    if result.rowcount != 1:
        raise TransitionError(f"job {job_id} is no longer running for {worker}")
    add_event(session, job_id, "retry", f"{error}; retrying at {at:%Y-%m-%d %H:%M:%S} UTC", level="warning")


def release(session: Session, job_id: int, worker: str, reason: str) -> None:
    """Give a running job back to the queue (graceful stop); it resumes from its checkpoints."""
    release_between_stages(session, job_id, worker)
    add_event(session, job_id, "released", reason)


def release_between_stages(session: Session, job_id: int, worker: str) -> None:
    """A stage is done and checkpointed; the job waits in the queue for its next stage."""
    session.execute(_RELEASE, {"job": job_id, "worker": worker})


def siblings_unfinished(session: Session, job_id: int, work_dir: str) -> bool:
    """Whether another job made from the same drop (sharing its originals) is not finished yet."""
    stmt = select(func.count()).select_from(Job).where(
        Job.work_dir == work_dir, Job.id != job_id, Job.state.not_in(FINAL_STATES))
    return bool(session.scalar(stmt))


def recover_abandoned(session: Session, now: datetime, is_dead, max_crashes: int) -> list[tuple[int, str]]:
    """Requeue running jobs whose worker died (``is_dead(claimed_by)``) or whose lease expired.

    Each such job counts a crash, but one that was only ``finishing`` (its results being
    written while its worker computed a job claimed after it): the crash was the other job's.
    A job recovered as a bystander ``max_crashes`` times counts from then on, so that even a
    job whose publishing kills the process cannot loop for ever. A job that reached
    ``max_crashes`` is failed, so that a job which kills the process cannot stop the queue.
    Returns ``(job_id, new_state)`` pairs.

    Several processes may recover at once (PostgreSQL): the rows are read ``FOR UPDATE SKIP
    LOCKED``, so each abandoned job is recovered (and its crash counted) by one of them, and a
    worker renewing its lease meanwhile waits for the verdict and then learns it lost the job.
    """
    stmt = select(Job).where(Job.state == JobState.RUNNING.value).with_for_update(skip_locked=True)
    changed = []
    for job in session.scalars(stmt):
        dead = is_dead(job.claimed_by)
        if not (dead or job.lease_until is None or job.lease_until < now):
            continue
        bystander = job.stage == FINISHING and _bystander_recoveries(session, job.id) < max_crashes
        if not bystander:
            job.crashes += 1
        where = f"during {job.stage}" + (f" step {job.step}" if job.step else "") if job.stage else "while claimed"
        if job.crashes >= max_crashes:
            job.state = JobState.FAILED.value
            job.error = f"the process died {job.crashes} times while running this job ({where})"
            job.error_kind = "crash"
            job.finished_at = now
            add_event(session, job.id, "failed", job.error, level="error")
            _notify_job(session, job.id, "failed", job.error, error=job.error, kind="crash")
        else:
            job.state = JobState.QUEUED.value
            how = "stopped" if dead else "lost its lease (no heartbeat)"
            add_event(session, job.id, "recovered",
                      f"worker {job.claimed_by} {how} {where}{BYSTANDER if bystander else ''}; "
                      "resuming from the last checkpoint", level="warning")
        job.claimed_by = None
        job.lease_until = None
        changed.append((job.id, job.state))
    return changed


BYSTANDER = " while it computed another job (no crash counted for this one)"


def _bystander_recoveries(session: Session, job_id: int) -> int:
    stmt = select(func.count()).select_from(Event).where(
        Event.job_id == job_id, Event.kind == "recovered", Event.message.contains(BYSTANDER))
    return int(session.scalar(stmt) or 0)


def retry(session: Session, job_id: int) -> Job:
    """A person asks to run a failed or cancelled job again."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise TransitionError(f"no job {job_id}")
    if job.state not in (JobState.FAILED.value, JobState.CANCELLED.value):
        raise TransitionError(f"job {job_id} is {job.state}; only failed or cancelled jobs can be retried")
    job.state = JobState.QUEUED.value
    job.attempts = 0
    job.crashes = 0
    job.error = None
    job.error_kind = None
    job.next_attempt_at = None
    job.cancel_requested = False
    job.finished_at = None
    add_event(session, job_id, "queued", "retry requested")
    return job


def cancel(session: Session, job_id: int) -> Job:
    """Cancel a queued job at once, or ask a running one to stop at its next step."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise TransitionError(f"no job {job_id}")
    if job.state in FINAL_STATES:
        raise TransitionError(f"job {job_id} is already {job.state}")
    if job.state == JobState.RUNNING.value:
        job.cancel_requested = True
        add_event(session, job_id, "cancel", "cancel requested; stopping at the next step")
    else:
        job.state = JobState.CANCELLED.value
        job.finished_at = utcnow()
        job.error = "cancelled on request"
        add_event(session, job_id, "cancelled", "cancelled before it ran")
    return job


def events_for(session: Session, job_id: int) -> list[Event]:
    return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
    return {state: count for state, count in rows}


def work_dir_jobs(session: Session) -> dict[str, list[tuple[str, Optional[datetime]]]]:
    """(state, finished_at) of the jobs of each work folder, keyed by the folder's name."""
    found: dict[str, list[tuple[str, Optional[datetime]]]] = {}
    for work_dir, state, finished_at in session.execute(select(Job.work_dir, Job.state, Job.finished_at)):
        found.setdefault(work_dir.rstrip("/").rsplit("/", 1)[-1], []).append((state, finished_at))
    return found


def last_alarm(session: Session, starting: str) -> Optional[Event]:
    """The newest alarm event whose message starts with ``starting`` (e.g. ``"preset winter "``)."""
    stmt = (select(Event).where(Event.job_id.is_(None), Event.kind == "alarm", Event.message.startswith(starting))
            .order_by(Event.id.desc()).limit(1))
    return session.scalars(stmt).first()
