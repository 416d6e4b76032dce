"""The checkpoint index (fingerprint -> file and sha256) and the per-job stage run records."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Optional

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.schema import FINAL_STATES, Checkpoint, Job, StageRun, utcnow

# The statements every unit of work runs, built once (see db/jobs.py).
_checkpoints, _runs = Checkpoint.__table__, StageRun.__table__
_EXISTING = select(_checkpoints.c.fingerprint).where(_checkpoints.c.fingerprint.in_(bindparam("fingerprints",
                                                                                                expanding=True)))


def _upsert(insert_: Callable) -> Any:
    """INSERT a checkpoint row, or update it from the inserted values when the fingerprint exists."""
    stmt = insert_(_checkpoints)
    return stmt.on_conflict_do_update(index_elements=[_checkpoints.c.fingerprint],
                                      set_={name: stmt.excluded[name]
                                            for name in ("stage", "path", "sha256", "size", "last_used_at")})


_RECORD = {"sqlite": _upsert(sqlite_insert), "postgresql": _upsert(postgresql_insert)}
_START_RUN = insert(_runs)
_FINISH_RUN = update(_runs).where(_runs.c.id == bindparam("run")).values(
    checkpoint_sha256=bindparam("sha256_"), duration_s=bindparam("duration_s_"),
    resumed_from_step=bindparam("resumed_from_step_"), error=bindparam("error_"), finished_at=bindparam("now"))


def lookup(session: Session, fingerprint: str) -> Optional[Checkpoint]:
    return session.get(Checkpoint, fingerprint)


def record(session: Session, fingerprint: str, stage: str, path: str, sha256: str, size: int) -> None:
    """Insert or update the index row: one statement (``INSERT ... ON CONFLICT DO UPDATE``), so
    that two workers recording the same checkpoint at once (jobs sharing an encoding) both succeed."""
    now = utcnow()
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        row = session.get(Checkpoint, fingerprint)
        if row is None:
            session.add(Checkpoint(fingerprint=fingerprint, stage=stage, path=path, sha256=sha256, size=size))
        else:
            row.path, row.sha256, row.size, row.last_used_at = path, sha256, size, now
        return
    session.execute(_RECORD[dialect], {"fingerprint": fingerprint, "stage": stage, "path": path, "sha256": sha256,
                                       "size": size, "created_at": now, "last_used_at": now})


def existing(session: Session, fingerprints: list[str]) -> set[str]:
    """Which of these fingerprints have a recorded checkpoint."""
    found: set[str] = set()
    for start in range(0, len(fingerprints), 500):
        chunk = fingerprints[start:start + 500]
        found.update(session.scalars(_EXISTING, {"fingerprints": chunk}))
    return found


def has_run(session: Session, job_id: int, stage: str, fingerprint: str) -> bool:
    """Whether the job already computed or reused this checkpoint."""
    stmt = select(StageRun.id).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                     StageRun.fingerprint == fingerprint,
                                     StageRun.checkpoint_sha256.is_not(None)).limit(1)
    return session.scalar(stmt) is not None


def touch(session: Session, fingerprint: str) -> None:
    session.execute(update(Checkpoint).where(Checkpoint.fingerprint == fingerprint)
                    .values(last_used_at=utcnow()))


def forget(session: Session, fingerprint: str) -> None:
    session.execute(delete(Checkpoint).where(Checkpoint.fingerprint == fingerprint))


def partial_fingerprint(fingerprint: str, step: int) -> str:
    return f"{fingerprint}.step{step}"


_PARTIALS = select(Checkpoint).where(Checkpoint.fingerprint > bindparam("after"),
                                     Checkpoint.fingerprint < bindparam("before"))


def partials(session: Session, fingerprint: str) -> list[Checkpoint]:
    """The per-step partial checkpoints of a stepped stage's fingerprint, newest step first (a
    range of the primary key: ``<fingerprint>.step<N>`` sorts between ``.step`` and ``.stepz``)."""
    rows = session.scalars(_PARTIALS, {"after": f"{fingerprint}.step", "before": f"{fingerprint}.stepz"})
    return sorted(rows, key=partial_step, reverse=True)


def partial_step(row: Checkpoint) -> int:
    return int(row.fingerprint.rsplit(".step", 1)[1])


def unused_since(session: Session, cutoff: datetime) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.last_used_at < cutoff)))


def all_by_age(session: Session) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).order_by(Checkpoint.last_used_at)))


def start_run(session: Session, job_id: int, stage: str, fingerprint: str, device: str, worker: str) -> int:
    result = session.execute(_START_RUN, {"job_id": job_id, "stage": stage, "fingerprint": fingerprint,
                                          "device": device, "worker": worker, "cache_hit": False,
                                          "started_at": utcnow()})
    return result.inserted_primary_key[0]


def finish_run(session: Session, run_id: int, sha256: Optional[str], duration_s: float,
               resumed_from_step: Optional[int] = None, error: Optional[str] = None) -> None:
    """The run ended: with its checkpoint's sha256, or with ``error``; ``resumed_from_step`` when
    it continued a partial."""
    session.execute(_FINISH_RUN, {"run": run_id, "sha256_": sha256, "duration_s_": duration_s,
                                  "resumed_from_step_": resumed_from_step, "error_": error, "now": utcnow()})


def record_run(session: Session, job_id: int, stage: str, fingerprint: str, sha256: Optional[str], device: str,
               worker: str, started_at: datetime, duration_s: float, resumed_from_step: Optional[int] = None,
               error: Optional[str] = None, load_s: float = 0.0) -> None:
    """A finished computation of a stage (with its checkpoint's sha256, or the error that ended it)."""
    session.execute(_START_RUN, {"job_id": job_id, "stage": stage, "fingerprint": fingerprint, "device": device,
                                 "worker": worker, "cache_hit": False, "started_at": started_at,
                                 "finished_at": utcnow(), "duration_s": duration_s, "checkpoint_sha256": sha256,
                                 "resumed_from_step": resumed_from_step, "error": error, "load_s": load_s})


def record_hit(session: Session, job_id: int, stage: str, fingerprint: str, sha256: str,
               device: str, worker: str) -> None:
    now = utcnow()
    session.add(StageRun(job_id=job_id, stage=stage, fingerprint=fingerprint, checkpoint_sha256=sha256,
                         cache_hit=True, started_at=now, finished_at=now, duration_s=0.0,
                         device=device, worker=worker))
    touch(session, fingerprint)


def runs_for(session: Session, job_id: int) -> list[StageRun]:
    return list(session.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.id)))


def in_use(session: Session) -> set[str]:
    """Fingerprints that unfinished jobs computed or reused (their partials share the prefix):
    retention never removes these."""
    stmt = (select(StageRun.fingerprint).join(Job, Job.id == StageRun.job_id)
            .where(Job.state.not_in(FINAL_STATES)).distinct())
    return set(session.scalars(stmt))


def forget_many(session: Session, fingerprints: list[str]) -> None:
    for start in range(0, len(fingerprints), 500):
        session.execute(delete(Checkpoint).where(Checkpoint.fingerprint.in_(fingerprints[start:start + 500])))
