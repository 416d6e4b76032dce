"""Tables: jobs, their stage runs, the checkpoint index and a readable event history."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Optional

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from config.spec import InputFile, JobSpec, Published


def utcnow() -> datetime:
    """Naive UTC: stored the same on SQLite and PostgreSQL, compared without surprises."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class JobState(str, Enum):
    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)


class SpecColumn(TypeDecorator):
    """``jobs.spec``: a JobSpec in, a JobSpec out (older versions upgraded on the way)."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else JobSpec.from_stored(value).stored()

    def process_result_value(self, value, dialect):
        return None if value is None else JobSpec.from_stored(value)


class InputsColumn(TypeDecorator):
    """``jobs.inputs``: a list of InputFile."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else [InputFile.model_validate(i).model_dump(mode="json") for i in value]

    def process_result_value(self, value, dialect):
        return None if value is None else [InputFile.model_validate(i) for i in value]


class PublishedColumn(TypeDecorator):
    """``jobs.result``: a Published, or None before the job is done."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else Published.model_validate(value).model_dump(mode="json")

    def process_result_value(self, value, dialect):
        return None if value is None else Published.model_validate(value)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(), dict: JSON, list: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text)  # the job file's path relative to the inbox
    preset: Mapped[Optional[str]] = mapped_column(String(255), index=True)  # the preset folder it was dropped into
    ingest_key: Mapped[str] = mapped_column(String(64), index=True)
    inbox_cleared: Mapped[bool] = mapped_column(Boolean, default=False)
    spec: Mapped[JobSpec] = mapped_column(SpecColumn)  # prompt, images, seed, effective parameters
    inputs: Mapped[list[InputFile]] = mapped_column(InputsColumn)
    work_dir: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    stage: Mapped[Optional[str]] = mapped_column(String(32))
    step: Mapped[Optional[int]] = mapped_column(Integer)
    steps_total: Mapped[Optional[int]] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    crashes: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[Optional[datetime]] = mapped_column()
    error: Mapped[Optional[str]] = mapped_column(Text)
    error_kind: Mapped[Optional[str]] = mapped_column(String(16))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    claimed_by: Mapped[Optional[str]] = mapped_column(String(255))
    lease_until: Mapped[Optional[datetime]] = mapped_column()
    output_name: Mapped[Optional[str]] = mapped_column(Text)  # outbox base name, reserved before publishing
    result: Mapped[Optional[Published]] = mapped_column(PublishedColumn)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)  # change feeds read by it
    started_at: Mapped[Optional[datetime]] = mapped_column()
    finished_at: Mapped[Optional[datetime]] = mapped_column()
    estimated_start: Mapped[Optional[datetime]] = mapped_column()  # as estimated when it was queued
    estimated_finish: Mapped[Optional[datetime]] = mapped_column()

    stage_runs: Mapped[list["StageRun"]] = relationship(back_populates="job", order_by="StageRun.id")

    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "created_at"),
                      Index("ix_jobs_state_id", "state", "id"))  # a state's jobs, newest first (the web's lists)


class StageRun(Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64))
    checkpoint_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    resumed_from_step: Mapped[Optional[int]] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column()
    duration_s: Mapped[Optional[float]] = mapped_column(Float)
    load_s: Mapped[Optional[float]] = mapped_column(Float)  # of duration_s, loading models
    device: Mapped[Optional[str]] = mapped_column(String(128))
    worker: Mapped[Optional[str]] = mapped_column(String(255))
    error: Mapped[Optional[str]] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="stage_runs")


class Checkpoint(Base):
    """A content-addressed stage result on disk and the sha256 it must have."""

    __tablename__ = "checkpoints"

    fingerprint: Mapped[str] = mapped_column(String(80), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class NotificationState(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"


class Notification(Base):
    """The durable notification outbox: one row per event (a job done or failed, an alarm),
    written in the transaction of the change it tells about, delivered to every target by the
    daemon's notification thread, at least once, under its idempotency ``key``."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # the idempotency key receivers see
    event: Mapped[str] = mapped_column(String(16))  # done | failed | alarm
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id"), index=True)
    title: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_to: Mapped[list] = mapped_column(default=list)  # ids of the targets that accepted it
    next_attempt_at: Mapped[Optional[datetime]] = mapped_column()
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column()

    __table_args__ = (Index("ix_notifications_due", "state", "next_attempt_at"),)
