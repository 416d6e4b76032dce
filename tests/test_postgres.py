"""Several daemons on one queue through a real PostgreSQL server (a private cluster started by
``tests/postgres.py``; the tests are skipped, with the reason, when none can be started).

The daemons are real ``run.py serve`` / ``run.py worker`` processes sharing one work folder,
inbox and outbox, as on several machines mounting the same share.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import pytest

from db import Database, jobs, utcnow
from db.database import current_revision, head_revision
from tests.daemon import Folders, tiny_job
from tests.postgres import PgFolders, PostgresServer, Unavailable
# The queue's state rules again, on PostgreSQL: collected here, they get this module's ``db``.
from tests.test_queue import (test_a_job_is_claimed_by_exactly_one_worker,  # noqa: F401
                              test_a_job_that_keeps_killing_the_process_is_failed_after_max_crashes,
                              test_a_live_workers_job_is_left_alone_until_its_lease_expires,
                              test_a_new_database_is_created_at_the_newest_schema, test_a_retry_waits_for_its_time,
                              test_cancel_and_retry_follow_the_state_rules,
                              test_higher_priority_then_older_jobs_come_first)

STAGES = ["prepare", "encode_text", "encode_latent", "sample", "decode"]
# Quick hand-overs between daemons in tests: leases of a few seconds, the queue polled often.
FAST = {"QIE_LEASE_SECONDS": "3", "QIE_POLL_INTERVAL": "0.2", "QIE_GC_INTERVAL": "0"}


@pytest.fixture(scope="session")
def pg_server():
    try:
        server = PostgresServer.start()
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL server for these tests: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    return pg_server.create_database()


@pytest.fixture
def pg_folders(tmp_path, pg_url) -> PgFolders:
    return PgFolders(tmp_path / "shared", None, url=pg_url, env_extra=dict(FAST))


@pytest.fixture
def db(pg_url):
    database = Database(pg_url)
    yield database
    database.close()


def new_jobs(db: Database, count: int) -> list[int]:
    with db.begin() as session:
        return [jobs.create_job(session, name=f"j{i}", source=f"j{i}.json", ingest_key=f"k{i}", spec={}, inputs=[],
                                work_dir=f"/w/{i}").id for i in range(count)]


def in_threads(count: int, target) -> list:
    """Run ``target(index)`` in ``count`` threads started together; their results, in order."""
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = target(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def reference_image(tmp_path, name: str, job: dict) -> bytes:
    """The output of ``job`` run in one go by one daemon on SQLite, in folders of its own."""
    reference = Folders(tmp_path / f"reference-{name}")
    reference.drop(name, job)
    result = reference.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    return (reference.outbox / f"{name}.png").read_bytes()


def computed_once(folders: PgFolders) -> dict[str, list[str]]:
    """For every job: its stages with a checkpoint, one entry per stage run (computed or reused)."""
    rows = folders.db_rows("SELECT j.name, r.stage FROM stage_runs r JOIN jobs j ON j.id = r.job_id "
                           "WHERE r.checkpoint_sha256 IS NOT NULL ORDER BY r.id")
    found: dict[str, list[str]] = {}
    for name, stage in rows:
        found.setdefault(name, []).append(stage)
    return found


def wait_all_done(daemon, folders: PgFolders, names: set[str], timeout: float = 180) -> None:
    try:
        daemon.wait_for(lambda: folders.job_states() == {n: "done" for n in names}, timeout=timeout,
                        what=f"{len(names)} jobs done")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\njobs then: {folders.job_states()}") from None


def run_jobs(folders: PgFolders, daemons: tuple, names: set[str],
             images: Optional[Callable[[int], dict]] = None) -> None:
    """Once every daemon is ready, drop one job per name (seeded by its place in sorted order),
    wait until all are done, and stop every daemon cleanly."""
    for daemon in daemons:
        daemon.wait_ready()
    for i, name in enumerate(sorted(names)):
        folders.drop(name, tiny_job(seed=i), images=images(i) if images else None)
    wait_all_done(daemons[0], folders, names)
    for daemon in daemons:
        assert daemon.stop() == 0


# The schema ---------------------------------------------------------------------------------------

def test_the_schema_and_its_migrations_work_on_postgresql(pg_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db import DatabaseError, head_revision, upgrade
    from db.database import alembic_config, create_db_engine
    from db.schema import Base

    # Preconditions: a database a first release left (schema 0001).
    command.upgrade(alembic_config(pg_url), "0001")
    # Action / postconditions: the daemon refuses it with the command; the command upgrades it.
    with pytest.raises(DatabaseError, match="db-upgrade"):
        Database(pg_url)
    upgrade(pg_url)
    database = Database(pg_url)
    database.close()
    engine = create_db_engine(pg_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_daemons_starting_together_on_an_empty_database_create_the_schema_once(pg_url):
    databases = in_threads(6, lambda _i: Database(pg_url))  # any daemon's error is raised here
    try:
        assert len(databases) == 6 and all(isinstance(database, Database) for database in databases)
        assert all(current_revision(database.engine) == head_revision() for database in databases)
        with databases[0].engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
        job_ids = new_jobs(databases[1], 3)  # the schema is whole: one daemon writes, another reads
        with databases[5].begin() as session:
            assert sorted(job.id for job in jobs.list_jobs(session, limit=10)) == sorted(job_ids)
    finally:
        for database in databases:
            database.close()


# Claiming ------------------------------------------------------------------------------------------

def test_many_concurrent_claimers_never_claim_a_job_twice(db, pg_url):
    job_ids = new_jobs(db, 300)
    claimers = [Database(pg_url) for _ in range(12)]  # each its own connections, as on its own machine

    def claim_all(index: int) -> list[int]:
        order = job_ids[:]
        random.Random(index).shuffle(order)
        won = []
        for job_id in order:
            with claimers[index].begin() as session:
                if jobs.claim(session, job_id, f"host{index}:1", 60, utcnow()):
                    won.append(job_id)
        return won

    won = in_threads(len(claimers), claim_all)
    for claimer in claimers:
        claimer.close()

    every_claim = [job_id for wins in won for job_id in wins]
    assert sorted(every_claim) == sorted(job_ids), "every job claimed exactly once"
    with db.begin() as session:
        holders = {job.id: job.claimed_by for job in jobs.list_jobs(session, limit=1000)}
    for index, wins in enumerate(won):
        assert all(holders[job_id] == f"host{index}:1" for job_id in wins)


def test_a_job_is_held_by_one_claimer_at_a_time_through_claims_and_releases(db, pg_url):
    job_ids = new_jobs(db, 5)
    claimers = [Database(pg_url) for _ in range(8)]
    holder: dict[int, str] = {}
    registry = threading.Lock()
    overlaps: list[str] = []

    def churn(index: int) -> int:
        me, claims = f"host{index}:1", 0
        rng = random.Random(index)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            job_id = rng.choice(job_ids)
            with claimers[index].begin() as session:
                if not jobs.claim(session, job_id, me, 60, utcnow()):
                    continue
            with registry:
                if job_id in holder:
                    overlaps.append(f"job {job_id} claimed by {me} while {holder[job_id]} held it")
                holder[job_id] = me
            claims += 1
            time.sleep(rng.random() / 1000)
            with registry:
                holder.pop(job_id, None)
            with claimers[index].begin() as session:
                jobs.release_between_stages(session, job_id, me)
        return claims

    claims = in_threads(len(claimers), churn)
    for claimer in claimers:
        claimer.close()
    assert overlaps == []
    assert sum(claims) > 100 and sum(1 for c in claims if c) >= 2


def test_concurrent_recoveries_requeue_each_abandoned_job_once(db, pg_url):
    job_ids = new_jobs(db, 60)
    past = utcnow() - timedelta(seconds=120)
    with db.begin() as session:
        for job_id in job_ids:
            assert jobs.claim(session, job_id, f"gone:{job_id}", 60, past)  # leases expired a minute ago
    recoverers = [Database(pg_url) for _ in range(8)]

    def recover(index: int) -> list[int]:
        with recoverers[index].begin() as session:
            return [job_id for job_id, _ in jobs.recover_abandoned(session, utcnow(), lambda _w: False, 3)]

    recovered = in_threads(len(recoverers), recover)
    for recoverer in recoverers:
        recoverer.close()
    assert sorted(j for found in recovered for j in found) == sorted(job_ids)
    with db.begin() as session:
        assert {(j.state, j.crashes) for j in jobs.list_jobs(session)} == {("queued", 1)}


def test_the_ingest_lock_is_held_by_one_process_at_a_time(db, pg_url):
    other = Database(pg_url)
    try:
        with db.exclusive("ingest") as mine:
            assert mine
            with other.exclusive("ingest") as theirs:
                assert not theirs
            with other.exclusive("retention") as theirs:
                assert theirs  # another name is another lock
        with other.exclusive("ingest") as theirs:
            assert theirs
    finally:
        other.close()


# Daemons sharing the queue ---------------------------------------------------------------------------

def test_several_workers_share_the_queue_and_do_every_job_exactly_once(pg_folders: PgFolders):
    names = {f"job{i}" for i in range(6)}
    with pg_folders.serve() as server, pg_folders.worker() as second, pg_folders.worker() as third:
        # each its own image: no checkpoint shared between jobs
        run_jobs(pg_folders, (server, second, third), names, images=lambda i: {"photo.png": (64 + 8 * i, 64)})

    assert sorted(p.name for p in pg_folders.outbox.glob("*.png")) == sorted(f"{n}.png" for n in names)
    runs = computed_once(pg_folders)
    assert {name: sorted(stages) for name, stages in runs.items()} == {name: sorted(STAGES) for name in names}
    assert pg_folders.db_rows("SELECT count(*) FROM jobs") == [(6,)]
    assert pg_folders.db_rows("SELECT sum(crashes) FROM jobs") == [(0,)]
    assert list(pg_folders.inbox.iterdir()) == []
    assert len(pg_folders.db_rows("SELECT DISTINCT worker FROM stage_runs")) >= 2, "the work was shared"


def test_stage_workers_split_the_pipeline_through_the_shared_checkpoints(pg_folders: PgFolders):
    # Preconditions: a "small GPU" ingests, encodes and decodes; a "big GPU" only samples. Their
    # devices differ (here: torch thread counts), yet they agree on every fingerprint.
    names = {"a", "b", "c"}
    with pg_folders.worker("--ingest", "--stages", "encode_text,encode_latent,decode", QIE_THREADS="2") as small, \
            pg_folders.worker("--stages", "sample", QIE_THREADS="1") as big:
        run_jobs(pg_folders, (small, big), names)

    host = os.uname().nodename
    small_name, big_name = f"{host}:{small.process.pid}", f"{host}:{big.process.pid}"
    rows = pg_folders.db_rows("SELECT stage, worker FROM stage_runs WHERE checkpoint_sha256 IS NOT NULL "
                              "AND cache_hit = false")
    assert {worker for stage, worker in rows if stage == "sample"} == {big_name}
    assert {worker for stage, worker in rows if stage != "sample"} == {small_name}
    assert len(list(pg_folders.outbox.glob("*.png"))) == 3
    devices = pg_folders.db_rows("SELECT DISTINCT stage, device FROM stage_runs WHERE stage IN ('sample', 'decode')")
    assert dict(devices) == {"sample": "cpu (1 threads) fake", "decode": "cpu (2 threads) fake"}


def test_a_worker_killed_mid_stage_has_its_job_finished_by_another_with_the_same_bytes(
        pg_folders: PgFolders, tmp_path):
    job = tiny_job(seed=5, steps=6)
    expected = reference_image(tmp_path, "edit", job)

    # Action: the first worker dies by SIGKILL right after sampling step 3; step 2's partial is
    # durable by then (the pause lets the writer store it), step 3's may be.
    pg_folders.drop("edit", job)
    with pg_folders.worker("--ingest", QIE_FAULTS="stage.sample.step2=pause:1,stage.sample.step3") as doomed:
        assert doomed.wait_exit() == -9
    assert pg_folders.job_states() == {"edit": "running"}

    # A second worker on the same machine sees that the claimer's process is gone.
    with pg_folders.worker() as survivor:
        wait_all_done(survivor, pg_folders, {"edit"})
        assert survivor.stop() == 0

    # Postconditions: the same bytes as the uninterrupted run; the survivor's sampling resumed
    # after step 2 (or 3); the killed worker's sampling left no finished run.
    assert (pg_folders.outbox / "edit.png").read_bytes() == expected
    assert pg_folders.db_rows("SELECT crashes FROM jobs") == [(1,)]
    resumed = pg_folders.db_rows("SELECT resumed_from_step, worker FROM stage_runs WHERE stage = 'sample' "
                                 "ORDER BY id")
    assert len(resumed) == 1 and resumed[0][0] in (2, 3)
    assert resumed[0][1] == f"{os.uname().nodename}:{survivor.process.pid}"


def test_a_job_of_a_machine_that_stopped_answering_is_resumed_when_its_lease_expires(
        pg_folders: PgFolders, tmp_path):
    job = tiny_job(seed=9, steps=6)
    expected = reference_image(tmp_path, "frozen", job)

    # Preconditions: a worker at sampling step 2 (held there), then frozen whole (SIGSTOP: its
    # heartbeat stops too, as when a machine hangs or loses the network).
    pg_folders.drop("frozen", job)
    with pg_folders.worker("--ingest", QIE_LEASE_SECONDS="2", QIE_FAULTS="stage.sample.step2=pause:3") as frozen:
        frozen.wait_for(lambda: pg_folders.db_rows("SELECT stage, step FROM jobs") == [("sample", 2)],
                        what="sampling step 2")
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            # Action: another worker takes the job over once the lease has expired.
            with pg_folders.worker(QIE_LEASE_SECONDS="2") as survivor:
                wait_all_done(survivor, pg_folders, {"frozen"})
                frozen.process.send_signal(signal.SIGCONT)
                # The frozen one wakes up, finds its lease lost and leaves the job alone.
                frozen.wait_for(lambda: "lease lost" in frozen.log, what="the lost lease noticed")
                time.sleep(1)
                assert survivor.stop() == 0
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        assert frozen.stop() == 0

    assert sorted(p.name for p in pg_folders.outbox.iterdir()) == ["frozen.json", "frozen.png"]
    assert (pg_folders.outbox / "frozen.png").read_bytes() == expected
    assert pg_folders.db_rows("SELECT state, crashes FROM jobs") == [("done", 1)]
    recovered = pg_folders.db_rows("SELECT message FROM events WHERE kind = 'recovered'")
    assert len(recovered) == 1 and "lost its lease" in recovered[0][0]


def test_a_stage_longer_than_the_lease_keeps_its_job_through_the_heartbeat(pg_folders: PgFolders):
    # Preconditions: a lease of one second; text encoding held for four (a long model load).
    with pg_folders.worker("--ingest", QIE_LEASE_SECONDS="1", QIE_FAULTS="stage.encode_text=pause:4") as slow, \
            pg_folders.worker(QIE_LEASE_SECONDS="1", QIE_FAULTS="stage.encode_text=pause:4") as other:
        for daemon in (slow, other):
            daemon.wait_ready()
        pg_folders.drop("long", tiny_job())
        wait_all_done(slow, pg_folders, {"long"})
        assert slow.stop() == 0 and other.stop() == 0

    # Postconditions: nobody took the job over; every stage ran once.
    assert pg_folders.db_rows("SELECT crashes FROM jobs") == [(0,)]
    assert pg_folders.db_rows("SELECT count(*) FROM events WHERE kind = 'recovered'") == [(0,)]
    assert sorted(computed_once(pg_folders)["long"]) == sorted(STAGES)


# Ingest and the work folder --------------------------------------------------------------------------

def test_two_ingesting_daemons_make_each_dropped_job_once(pg_folders: PgFolders):
    names = {f"drop{i}" for i in range(8)}
    with pg_folders.serve() as first, pg_folders.serve() as second:
        run_jobs(pg_folders, (first, second), names)

    assert sorted(n for (n,) in pg_folders.db_rows("SELECT name FROM jobs")) == sorted(names)
    assert sorted(p.name for p in pg_folders.outbox.glob("*.png")) == sorted(f"{n}.png" for n in names)
    assert list(pg_folders.failed.iterdir()) == []


def test_a_daemon_does_not_scan_while_another_holds_the_ingest_lock(pg_folders: PgFolders, db):
    pg_folders.drop("held", tiny_job())
    with db.exclusive("ingest") as mine:
        assert mine
        result = pg_folders.run("serve", "--once")
        assert result.returncode == 0, result.stderr
        assert pg_folders.job_states() == {}
    result = pg_folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert pg_folders.job_states() == {"held": "done"}


def test_postgresql_daemons_share_a_work_folder_but_an_sqlite_daemon_may_not_join(pg_folders: PgFolders):
    with pg_folders.worker() as worker:
        worker.wait_ready()
        sqlite = pg_folders.run("serve", "--once", QIE_DATABASE_URL="")
        assert sqlite.returncode == 1
        assert "another qie-hotfolder daemon" in sqlite.stderr and "PostgreSQL" in sqlite.stderr
        assert worker.stop() == 0


def test_a_worker_with_once_exits_when_the_queue_is_drained(pg_folders: PgFolders):
    pg_folders.drop("one", tiny_job())
    pg_folders.drop("two", tiny_job(seed=2))
    result = pg_folders.run("worker", "--ingest", "--once")
    assert result.returncode == 0, result.stderr
    assert pg_folders.job_states() == {"one": "done", "two": "done"}


def test_a_worker_rejects_an_unknown_stage(pg_folders: PgFolders):
    result = pg_folders.run("worker", "--stages", "sample,upscale")
    assert result.returncode == 1
    assert "unknown stage upscale" in result.stderr


# Leases, liveness and stage lists (no daemon) -------------------------------------------------------

def test_a_claimer_counts_as_dead_only_when_known_to_be_gone():
    from processor.lease import is_dead
    me, host = "box:100", "box"
    assert not is_dead(me, me, host, exclusive=True)
    assert not is_dead(f"box:{os.getpid()}", me, host, exclusive=False), "a live process on this host"
    assert is_dead("box:999999999", me, host, exclusive=False), "no such process on this host"
    assert is_dead(f"box:{os.getpid()}", me, host, exclusive=True), "SQLite: no other daemon can be here"
    assert not is_dead("other:1", me, host, exclusive=True), "another machine: only its lease tells"


def test_the_heartbeat_renews_the_lease_and_notices_when_it_is_lost(db):
    from processor.lease import Heartbeat
    (job_id,) = new_jobs(db, 1)
    with db.begin() as session:
        assert jobs.claim(session, job_id, "box:1", 1, utcnow())
        first = jobs.get_job(session, job_id).lease_until
    heartbeat = Heartbeat(db, "box:1", lease_seconds=1, stall_seconds=60, interval=0.05, progress_interval=0.05)
    heartbeat.hold(job_id)
    heartbeat.start()
    try:
        time.sleep(0.5)
        with db.begin() as session:
            assert jobs.get_job(session, job_id).lease_until > first + timedelta(seconds=0.3)
        with db.begin() as session:  # another worker recovered and claimed it meanwhile
            jobs.get_job(session, job_id).claimed_by = "elsewhere:2"
        deadline = time.monotonic() + 2
        while not heartbeat.lost(job_id) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heartbeat.lost(job_id)
    finally:
        heartbeat.stop()
    assert heartbeat.renewals >= 5


def test_the_heartbeat_lets_the_lease_run_out_when_the_unit_shows_no_progress(db):
    from processor.lease import Heartbeat
    (job_id,) = new_jobs(db, 1)
    with db.begin() as session:
        assert jobs.claim(session, job_id, "box:1", 1, utcnow())
    heartbeat = Heartbeat(db, "box:1", lease_seconds=1, stall_seconds=0.2, interval=0.05, progress_interval=0.05)
    heartbeat.hold(job_id)
    heartbeat.start()
    try:
        time.sleep(0.6)  # no beat() after the start: a hung compute thread
        renewed = heartbeat.renewals
        time.sleep(0.3)
        assert heartbeat.renewals == renewed < 10
    finally:
        heartbeat.stop()
    assert not heartbeat.lost(job_id)


def test_a_stage_list_adds_the_model_free_units_to_the_stages_that_need_them():
    from processor.scheduler import claimed_stages
    assert claimed_stages(["sample"]) == {"sample"}
    assert claimed_stages(["encode_text", "decode"]) == {"prepare", "encode_text", "decode", "publish"}
    with pytest.raises(ValueError, match="unknown stage upscale"):
        claimed_stages(["sample", "upscale"])
