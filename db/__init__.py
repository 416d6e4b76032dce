"""All SQL: the schema, its migrations, job state transitions and the checkpoint index."""

from db import checkpoints, jobs, notifications, views
from db.database import Database, DatabaseError, current_revision, head_revision, upgrade
from db.schema import FINAL_STATES, Checkpoint, Event, Job, JobState, StageRun, utcnow

__all__ = ["checkpoints", "jobs", "notifications", "views", "Database", "DatabaseError", "current_revision", "head_revision",
           "upgrade", "FINAL_STATES", "Checkpoint", "Event", "Job", "JobState", "StageRun", "utcnow"]
