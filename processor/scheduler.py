"""Choosing what runs next: the best queued job whose retry time has come.

Priority first, then age. Claiming is the database's conditional UPDATE, so a job that
another worker took in the meantime is simply skipped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from config import Settings
from db import Database, Job, jobs


class Scheduler:
    def __init__(self, settings: Settings, db: Database, worker: str):
        self.settings = settings
        self.db = db
        self.worker = worker

    def claim_next(self, now: datetime) -> Optional[Job]:
        """Claim and return the next job to run, or None when nothing is due."""
        with self.db.begin() as session:
            candidates = [job.id for job in jobs.claimable(session, now)]
        for job_id in candidates:
            with self.db.begin() as session:
                if jobs.claim(session, job_id, self.worker, self.settings.lease_seconds, now):
                    return jobs.get_job(session, job_id)
        return None

    def next_retry(self) -> Optional[datetime]:
        with self.db.begin() as session:
            return jobs.next_retry_at(session)
