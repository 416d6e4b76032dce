"""Retention: checkpoints, orphans, the archive and work folders are cleaned by age and size,
never taking what an unfinished job needs."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from config import load_settings
from config import JobSpec
from db import Checkpoint, Database, checkpoints, jobs
from processor import retention
from tests.daemon import Folders

NOW = datetime(2026, 11, 27, 12, 0, 0)


@pytest.fixture
def env(tmp_path: Path):
    def make(**settings):
        s = load_settings(None, work=tmp_path / "work", archive=tmp_path / "archive", state=tmp_path / "state.db",
                          inbox=tmp_path / "inbox", **settings)
        return s
    db = Database(f"sqlite:///{tmp_path / 'state.db'}")
    yield make, db
    db.close()


def add_checkpoint(settings, db, fingerprint: str, size: int, days_unused: float, stage: str = "sample") -> Path:
    path = settings.work / "cache" / stage / f"{fingerprint}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    with db.begin() as session:
        checkpoints.record(session, fingerprint, stage, str(path), "sha", size)
        session.flush()
        session.execute(update(Checkpoint).where(Checkpoint.fingerprint == fingerprint)
                        .values(last_used_at=NOW - timedelta(days=days_unused)))
    return path


def add_job(db, state: str, work_dir: str = "/w/jobs/x", fingerprints=(), finished_days_ago=None) -> int:
    with db.begin() as session:
        job = jobs.create_job(session, name="j", source="j.json", ingest_key="k", spec=JobSpec(prompt="p", seed=1, output_name="j"), inputs=[],
                              work_dir=work_dir)
        job.state = state
        if finished_days_ago is not None:
            job.finished_at = NOW - timedelta(days=finished_days_ago)
        for fp in fingerprints:
            checkpoints.start_run(session, job.id, "sample", fp, "cpu", "w")
        return job.id


def age(path: Path, seconds: float) -> None:
    then = (NOW - datetime(1970, 1, 1)).total_seconds() - seconds
    os.utime(path, (then, then))


def removed(report, kind: str) -> set[str]:
    return {Path(r.path).name for r in report.removed if r.kind == kind}


def test_old_checkpoints_go_but_never_those_of_an_unfinished_job(env):
    make, db = env
    settings = make(cache_max_age_days=30)
    old = add_checkpoint(settings, db, "old", 10, days_unused=40)
    in_use = add_checkpoint(settings, db, "queuedjob", 10, days_unused=40)
    partial = add_checkpoint(settings, db, "queuedjob.step3", 10, days_unused=40)
    done_job = add_checkpoint(settings, db, "donejob", 10, days_unused=40)
    recent = add_checkpoint(settings, db, "recent", 10, days_unused=1)
    add_job(db, "queued", fingerprints=["queuedjob"])
    add_job(db, "done", fingerprints=["donejob"])

    dry = retention.collect(settings, db, NOW, dry_run=True)
    assert removed(dry, "checkpoint") == {"old.safetensors", "donejob.safetensors"}
    assert old.exists() and "would remove 2 checkpoints (20 B)" in dry.summary()

    report = retention.collect(settings, db, NOW)
    assert removed(report, "checkpoint") == {"old.safetensors", "donejob.safetensors"}
    assert not old.exists() and not done_job.exists()
    assert in_use.exists() and partial.exists() and recent.exists()
    with db.begin() as session:
        assert {r.fingerprint for r in checkpoints.all_by_age(session)} == {"queuedjob", "queuedjob.step3", "recent"}


def test_the_cache_is_trimmed_to_its_size_least_recently_used_first(env):
    make, db = env
    settings = make(cache_max_bytes=250)
    paths = {name: add_checkpoint(settings, db, name, 100, days_unused=days)
             for name, days in (("oldest", 5), ("protected", 4), ("older", 3), ("newest", 1))}
    add_job(db, "running", fingerprints=["protected"])

    report = retention.collect(settings, db, NOW)
    # 400 bytes: the oldest two that may go are removed, leaving 200 <= 250.
    assert removed(report, "checkpoint") == {"oldest.safetensors", "older.safetensors"}
    assert sorted(name for name, p in paths.items() if p.exists()) == ["newest", "protected"]


def test_files_the_index_does_not_know_go_once_an_hour_old(env):
    make, db = env
    settings = make()
    known = add_checkpoint(settings, db, "known", 10, days_unused=0)
    age(known, 7200)
    cache = settings.work / "cache" / "decode"
    cache.mkdir(parents=True)
    orphan, young, temp, other = (cache / "lost.safetensors", cache / "young.safetensors",
                                  cache / ".x.safetensors.123.tmp", cache / "README")
    for path in (orphan, young, temp, other):
        path.write_bytes(b"y" * 5)
    for path in (orphan, temp, other):
        age(path, 7200)
    age(young, 600)

    report = retention.collect(settings, db, NOW)
    assert removed(report, "orphan") == {"lost.safetensors", ".x.safetensors.123.tmp"}
    assert known.exists() and young.exists() and other.exists() and not orphan.exists() and not temp.exists()


def test_a_checkpoint_whose_file_vanished_leaves_the_index(env):
    make, db = env
    settings = make()
    add_checkpoint(settings, db, "gone", 10, days_unused=0).unlink()
    report = retention.collect(settings, db, NOW)
    assert removed(report, "index") == {"gone.safetensors"}
    with db.begin() as session:
        assert checkpoints.lookup(session, "gone") is None


def test_the_archive_is_kept_unless_limits_are_set_then_cleaned_by_age_and_size(env):
    make, db = env
    entries = {}
    for name, days, size in (("1-a", 40, 10), ("2-b", 20, 10), ("winter/3-c", 10, 10), ("4-d", 1, 10)):
        folder = make().archive / name
        folder.mkdir(parents=True)
        (folder / "photo.png").write_bytes(b"z" * size)
        age(folder, days * 86400)
        entries[name] = folder
    (make().archive / "notes.txt").write_text("not an archived job")

    assert retention.collect(make(), db, NOW).removed == []
    report = retention.collect(make(archive_max_age_days=30, archive_max_bytes=25), db, NOW)
    # 1-a is too old; of the 30 bytes left, the oldest (2-b) goes to reach 20 <= 25.
    assert [Path(r.path).name for r in report.removed if r.kind == "archive"] == ["1-a", "2-b"]
    assert sorted(n for n, p in entries.items() if p.exists()) == ["4-d", "winter/3-c"]
    assert (make().archive / "notes.txt").exists()

    retention.collect(make(archive_max_bytes=15), db, NOW)
    assert not (make().archive / "winter").exists()  # its preset folder went with its last job


def test_work_folders_of_finished_jobs_go_failed_and_unfinished_ones_stay(env):
    make, db = env
    settings = make(cache_max_age_days=30)
    root = settings.work / "jobs"
    for name in ("done", "failed", "queued", "cancelled-old", "cancelled-new", "unknown-old", "unknown-new"):
        (root / name / "originals").mkdir(parents=True)
        (root / name / "originals" / "photo.png").write_bytes(b"p")
    add_job(db, "done", str(root / "done"))
    add_job(db, "failed", str(root / "failed"))
    add_job(db, "queued", str(root / "queued"))
    add_job(db, "cancelled", str(root / "cancelled-old"), finished_days_ago=40)
    add_job(db, "cancelled", str(root / "cancelled-new"), finished_days_ago=2)
    age(root / "unknown-old", 2 * 86400)
    age(root / "unknown-new", 3600)

    report = retention.collect(settings, db, NOW)
    assert removed(report, "work") == {"done", "cancelled-old", "unknown-old"}
    assert sorted(p.name for p in root.iterdir()) == ["cancelled-new", "failed", "queued", "unknown-new"]


def test_gc_command_and_the_daemon_clean_up(folders: Folders):
    # An orphan checkpoint from an hour and more ago, and an old unknown work folder.
    orphan = folders.work / "cache" / "sample" / "lost.safetensors"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 100)
    stale = folders.work / "jobs" / "deadbeef-00000000"
    stale.mkdir(parents=True)
    old = datetime.now().timestamp() - 2 * 86400
    os.utime(orphan, (old, old))
    os.utime(stale, (old, old))
    assert folders.run("db-upgrade").returncode == 0

    dry = folders.run("gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove orphan {orphan}" in dry.stdout and f"would remove work {stale}" in dry.stdout
    assert orphan.exists() and stale.exists()

    # The daemon does it by itself when idle (every gc_interval, first at start-up).
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert "clean-up: removed 1 orphan files (100 B), 1 work folders" in result.stderr
    assert not orphan.exists() and not stale.exists()
    assert folders.run("gc").stdout.strip() == "nothing to remove"
