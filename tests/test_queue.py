"""The job queue in the database: one claimer wins, crashes are counted, poison jobs stop."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import inspect, text

from config import JobSpec
from db import Database, JobState, checkpoints, jobs, utcnow
from db.database import DatabaseError, alembic_config
from processor.scheduler import QueueView


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'state.db'}")
    yield database
    database.close()


def new_job(db, name="j", priority=0):
    with db.begin() as session:
        return jobs.create_job(session, name=name, source=f"{name}.json", ingest_key=name, spec=JobSpec(prompt="p", seed=1, output_name=name), inputs=[],
                               work_dir="/w", priority=priority).id


def test_a_job_is_claimed_by_exactly_one_worker(db):
    job_id = new_job(db)
    now = utcnow()
    with db.begin() as session:
        assert jobs.claim(session, job_id, "a:1", 60, now)
    with db.begin() as session:
        assert not jobs.claim(session, job_id, "b:2", 60, now)
        assert jobs.get_job(session, job_id).claimed_by == "a:1"


def test_higher_priority_then_older_jobs_come_first(db):
    low, high, later_high = new_job(db, "low", 0), new_job(db, "high", 5), new_job(db, "later", 5)
    with db.begin() as session:
        assert [j.id for j in jobs.claimable(session, utcnow())] == [high, later_high, low]


def test_a_retry_waits_for_its_time(db):
    job_id = new_job(db)
    now = utcnow()
    with db.begin() as session:
        jobs.claim(session, job_id, "a:1", 60, now)
        jobs.schedule_retry(session, job_id, "a:1", "disk full", now + timedelta(seconds=30))
    with db.begin() as session:
        assert jobs.claimable(session, now) == []
        assert [j.id for j in jobs.claimable(session, now + timedelta(seconds=31))] == [job_id]


def test_a_job_that_keeps_killing_the_process_is_failed_after_max_crashes(db):
    job_id = new_job(db)
    for crash in range(1, 4):
        with db.begin() as session:
            assert jobs.claim(session, job_id, "host:1", 60, utcnow())
        with db.begin() as session:
            changed = jobs.recover_abandoned(session, utcnow(), lambda worker: True, max_crashes=3)
        expected = JobState.FAILED.value if crash == 3 else JobState.QUEUED.value
        assert changed == [(job_id, expected)]
    with db.begin() as session:
        job = jobs.get_job(session, job_id)
        assert job.crashes == 3 and "died 3 times" in job.error


def test_a_live_workers_job_is_left_alone_until_its_lease_expires(db):
    job_id = new_job(db)
    now = utcnow()
    with db.begin() as session:
        jobs.claim(session, job_id, "other:1", 60, now)
    with db.begin() as session:
        assert jobs.recover_abandoned(session, now, lambda worker: False, 3) == []
    with db.begin() as session:
        assert jobs.recover_abandoned(session, now + timedelta(seconds=61), lambda worker: False, 3) == [(job_id, "queued")]


def test_cancel_and_retry_follow_the_state_rules(db):
    job_id = new_job(db)
    with db.begin() as session:
        assert jobs.cancel(session, job_id).state == "cancelled"
    with db.begin() as session:
        with pytest.raises(jobs.TransitionError, match="already cancelled"):
            jobs.cancel(session, job_id)
    with db.begin() as session:
        assert jobs.retry(session, job_id).state == "queued"
    with db.begin() as session:
        with pytest.raises(jobs.TransitionError, match="only failed or cancelled"):
            jobs.retry(session, job_id)


def test_an_old_schema_is_refused_with_the_upgrade_command(tmp_path):
    from alembic import command
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0002")  # a database the previous release left
    with pytest.raises(DatabaseError, match="at schema version 0002, this version needs .*run.py db-upgrade"):
        Database(url)


def test_a_new_database_is_created_at_the_newest_schema(db):
    assert {"jobs", "stage_runs", "checkpoints", "events", "alembic_version"} <= set(inspect(db.engine).get_table_names())


class PlanningRunner:
    """Plans every job as a two-stage chain of made-up fingerprints, and notes what it planned."""

    def __init__(self):
        self.planned: list[int] = []

    def plan(self, job):
        self.planned.append(job.id)
        return SimpleNamespace(chain={"prepare": f"prep-{job.name}", "encode_text": f"text-{job.name}"})


def test_the_scheduler_reads_again_only_the_jobs_that_changed(db, monkeypatch):
    ids = [new_job(db, f"job{i}") for i in range(3)]
    looked_up: list[list[str]] = []
    real_existing = checkpoints.existing
    monkeypatch.setattr(checkpoints, "existing", lambda s, fps: looked_up.append(sorted(fps)) or real_existing(s, fps))
    runner = PlanningRunner()
    view = QueueView(runner)

    assert [known.job.id for known in view.read(db, utcnow())] == ids
    assert runner.planned == ids and len(looked_up[-1]) == 6
    view.read(db, utcnow())
    assert looked_up[-1] == [] and runner.planned == ids  # nothing changed: nothing read again

    with db.begin() as session:  # a worker runs a stage of job 1 and hands it back
        assert jobs.claim(session, ids[1], "w", 60, utcnow())
        checkpoints.record(session, "prep-job1", "prepare", "/c/p", "0" * 64, 1)
        jobs.release_between_stages(session, ids[1], "w")
    view.read(db, utcnow())
    assert looked_up[-1] == ["prep-job1", "text-job1"] and runner.planned == ids
    assert view.recorded == {"prep-job1"}
