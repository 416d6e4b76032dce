"""What a person asks of a job, the same from the command line and from the web: retry, cancel.

The state change goes through ``db/jobs.py``; what it leaves stale in the folders goes with it
(a retried job's report in failed/ would only invite a duplicate drop).
"""

from __future__ import annotations

from config import Settings
from db import Database, Job, jobs
from processor import publish


def retry(settings: Settings, db: Database, job_id: int) -> Job:
    """Queue a failed or cancelled job again (TransitionError otherwise)."""
    with db.begin() as session:
        job = jobs.retry(session, job_id)
    publish.remove_failure_report(settings, job.name, job.id)
    return job


def cancel(settings: Settings, db: Database, job_id: int) -> Job:
    """Cancel a queued job at once, or ask a running one to stop at its next step."""
    with db.begin() as session:
        return jobs.cancel(session, job_id)
