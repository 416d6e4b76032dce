"""Schema changes go through Alembic: an old database is refused with the command that
upgrades it, and upgrading keeps the job history."""

from __future__ import annotations

import json
import sqlite3

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db import head_revision
from db.database import alembic_config, create_db_engine
from db.schema import Base
from tests.daemon import Folders

HISTORY = [
    "INSERT INTO jobs (id, name, source, ingest_key, inbox_cleared, spec, inputs, work_dir, state, stage, priority, "
    "attempts, crashes, cancel_requested, result, created_at, updated_at, finished_at) VALUES "
    "(1, 'winter', 'winter/job.json', 'k1', 1, ?, '[]', '/w/jobs/a', 'done', NULL, 0, 1, 0, 0, ?, "
    "'2026-11-01 10:00:00', '2026-11-01 10:00:09', '2026-11-01 10:00:09')",
    "INSERT INTO jobs (id, name, source, ingest_key, inbox_cleared, spec, inputs, work_dir, state, stage, priority, "
    "attempts, crashes, cancel_requested, error, error_kind, created_at, updated_at) VALUES "
    "(2, 'broken', 'broken.json', 'k2', 1, '{}', '[]', '/w/jobs/b', 'failed', 'sample', 5, 3, 1, 0, "
    "'out of memory (gave up after 3 attempts)', 'transient', '2026-11-02 08:00:00', '2026-11-02 08:05:00')",
    "INSERT INTO events (job_id, at, level, kind, message) VALUES (1, '2026-11-01 10:00:09', 'info', 'done', 'published')",
    "INSERT INTO events (job_id, at, level, kind, message) VALUES (2, '2026-11-02 08:05:00', 'error', 'failed', 'oom')",
    "INSERT INTO stage_runs (job_id, stage, fingerprint, checkpoint_sha256, cache_hit, started_at, duration_s) "
    "VALUES (1, 'sample', 'f' , 'abc', 0, '2026-11-01 10:00:01', 4.5)",
    "INSERT INTO checkpoints (fingerprint, stage, path, sha256, size, created_at, last_used_at) "
    "VALUES ('f', 'sample', '/w/cache/sample/f.safetensors', 'abc', 123, '2026-11-01 10:00:05', '2026-11-01 10:00:05')",
]
TABLES = ("jobs", "events", "stage_runs", "checkpoints")


def make_first_version_database(folders: Folders) -> None:
    """A database as the first release left it: schema 0001 with some history."""
    command.upgrade(alembic_config(f"sqlite:///{folders.state}"), "0001")
    spec = json.dumps({"prompt": "make it winter", "seed": 3, "parameters": {"steps": 4}})
    result = json.dumps({"image": "/outbox/winter.png"})
    with sqlite3.connect(folders.state) as conn:
        for statement in HISTORY:
            conn.execute(statement, (spec, result) if statement.count("?") == 2 else ())


def dump(folders: Folders) -> dict[str, list[tuple]]:
    with sqlite3.connect(folders.state) as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in TABLES}


def test_an_old_database_is_refused_then_upgraded_without_losing_history(folders: Folders):
    make_first_version_database(folders)
    before = dump(folders)

    # The daemon will not run on a schema it does not know, and says what to run.
    refused = folders.run("serve", "--once")
    assert refused.returncode == 3  # the unit does not restart on it
    assert "schema version 0001" in refused.stderr and "python run.py db-upgrade" in refused.stderr
    assert dump(folders) == before

    upgraded = folders.run("db-upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"0001 -> {head_revision()}" in upgraded.stdout

    after = dump(folders)
    with sqlite3.connect(folders.state) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    added = [columns.index(name) for name in ("preset", "estimated_start", "estimated_finish")]
    # Every row is still there with every value; the new columns are empty for old jobs.
    assert [tuple(v for i, v in enumerate(row) if i not in added) for row in after["jobs"]] == before["jobs"]
    assert [[row[i] for i in added] for row in after["jobs"]] == [[None] * 3, [None] * 3]
    assert {t: after[t] for t in TABLES if t not in ("jobs", "stage_runs")} == \
        {t: before[t] for t in TABLES if t not in ("jobs", "stage_runs")}
    # stage_runs gained load_s (empty for old runs) at the end.
    assert [row[:-1] for row in after["stage_runs"]] == before["stage_runs"]
    assert [row[-1] for row in after["stage_runs"]] == [None]

    status = json.loads(folders.run("status", "--json").stdout)["jobs"]
    assert [(j["name"], j["state"]) for j in status] == [("broken", "failed"), ("winter", "done")]
    assert folders.run("serve", "--once").returncode == 0


def test_the_models_and_the_newest_migration_agree(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    command.upgrade(alembic_config(url), "head")
    with create_db_engine(url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    command.downgrade(alembic_config(url), "0001")  # and every migration can be undone
    command.upgrade(alembic_config(url), "head")
