"""What a hostile tester found against the real daemon, each as a specification: files replaced
during ingest, links out of the inbox, a database that refuses writes, two daemons on one inbox,
a watch that goes deaf, jobs that take each other's files, and a waiting job's cost.

All through the real daemon process (``run.py serve``), the real SQLite file and the fake engine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import subprocess
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from tests.daemon import Folders, make_image, tiny_job


def errors(folders: Folders) -> dict[str, dict]:
    return {p.name[:-len(".error.json")]: json.loads(p.read_text()) for p in folders.failed.glob("*.error.json")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_sha(folders: Folders, job_id: int, name: str) -> str:
    [(inputs,)] = folders.db_rows("SELECT inputs FROM jobs WHERE id = ?", (job_id,))
    return next(i["sha256"] for i in json.loads(inputs) if i["name"] == name)


def alarms(folders: Folders) -> list[str]:
    return [m for (m,) in folders.db_rows("SELECT message FROM events WHERE kind = 'alarm' ORDER BY id")]


# A file replaced during ingest -----------------------------------------------------------------

def test_a_file_replaced_after_its_job_was_recorded_is_not_deleted_but_becomes_a_new_drop(folders: Folders):
    # Preconditions: a folder job, and a new version of its photo ready to be renamed into place.
    folders.drop("swap", tiny_job())
    old = sha256(folders.inbox / "swap" / "photo.png")
    new = make_image(folders.root / "new.png", colour=(200, 30, 30))
    new_sha = sha256(new)

    # Action: the new version arrives after the job was recorded, before the inbox is cleared.
    with folders.serve(QIE_FAULTS="ingest.recorded@1=pause:4") as daemon:
        daemon.wait_for(lambda: folders.db_rows("SELECT id FROM jobs"), what="the job recorded")
        new.rename(folders.inbox / "swap" / "photo.png")
        daemon.wait_for(lambda: [s for (s,) in folders.db_rows("SELECT state FROM jobs")] == ["done", "done"],
                        what="the old version's job and the new version's job")
        assert daemon.stop() == 0

    # Postconditions: the first job has the version it copied, the new version was not lost:
    # it (with its job file) made a second job; the inbox is empty; an event says what happened.
    assert input_sha(folders, 1, "photo.png") == old
    assert input_sha(folders, 2, "photo.png") == new_sha
    assert list(folders.inbox.iterdir()) == []
    [(note,)] = folders.db_rows("SELECT message FROM events WHERE kind = 'inbox'")
    assert "swap/photo.png" in note and "new drop" in note


def test_a_file_replaced_while_it_is_copied_makes_one_job_of_the_new_version(folders: Folders):
    folders.drop("early", tiny_job(), folder=False)  # early.json and photo.png in the inbox itself
    new = make_image(folders.root / "new.png", colour=(30, 200, 30))
    new_sha = sha256(new)
    with folders.serve(QIE_FAULTS="ingest.copied@1=pause:4") as daemon:
        daemon.wait_for(lambda: list(folders.work.glob("jobs/*/originals/photo.png")), what="the copy")
        new.rename(folders.inbox / "photo.png")
        daemon.wait_for(lambda: folders.job_states().get("early") == "done", what="the job")
        assert daemon.stop() == 0
    assert folders.db_rows("SELECT COUNT(*) FROM jobs") == [(1,)]
    assert input_sha(folders, 1, "photo.png") == new_sha
    assert list(folders.inbox.iterdir()) == []


# Links out of the inbox ------------------------------------------------------------------------

def test_job_and_preset_files_that_are_links_are_refused_and_never_followed(folders: Folders, tmp_path: Path):
    # Preconditions: files outside the inbox, and links to them where the daemon reads job files.
    secret_job = tmp_path / "secret-job.json"
    secret_job.write_text(json.dumps(tiny_job(prompt="SECRET JOB")))
    secret_preset = tmp_path / "secret-preset.json"
    secret_preset.write_text(json.dumps({"prompt": "SECRET PRESET", "megapixels": 0.004}))
    linked = folders.inbox / "linked"
    make_image(linked / "photo.png")
    os.symlink(secret_job, linked / "job.json")
    os.symlink(secret_job, folders.inbox / "rootlink.json")
    winter = folders.inbox / "winter"
    make_image(winter / "a.png")
    os.symlink(secret_preset, winter / "preset.json")

    result = folders.run("serve", "--once")

    # Postconditions: no job; the job files are refused naming the link, and moved to failed/
    # as links; the preset's photo waits under an alarm; nothing outside was read into the
    # database or changed.
    assert result.returncode == 0, result.stderr
    assert folders.job_states() == {}
    reports = errors(folders)
    assert "job.json is a symbolic link" in reports["linked"]["error"]
    assert "rootlink.json is a symbolic link" in reports["rootlink"]["error"]
    assert (folders.failed / "linked" / "job.json").is_symlink()
    assert any("preset.json is a symbolic link" in m for m in alarms(folders))
    assert (winter / "a.png").exists()
    everything = json.dumps(folders.db_rows("SELECT * FROM events") + folders.db_rows("SELECT * FROM jobs"))
    assert "SECRET" not in everything
    assert json.loads(secret_job.read_text())["prompt"] == "SECRET JOB"


# A database that refuses writes ----------------------------------------------------------------

@contextmanager
def read_only(path: Path) -> Iterator[bool]:
    """``path`` refuses writes meanwhile, as on a read-only mount: immutable for root (who
    ignores permissions), read-only permissions for others. Yields False where neither works."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield True
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_database_makes_serve_once_exit_with_an_alarm_without_copying_again(folders: Folders):
    # Preconditions: a database made by an earlier run, a drop waiting.
    assert folders.run("serve", "--once").returncode == 0
    folders.drop("kept", tiny_job())

    # Action: serve --once while the database file refuses writes.
    with read_only(folders.state) as refused:
        # Where the file cannot be made read-only, SQLite opens it read-only instead.
        env = {} if refused else {"QIE_DATABASE_URL": f"sqlite:///file:{folders.state}?mode=ro&uri=true"}
        with folders.serve("--once", **env) as daemon:
            code = daemon.wait_exit(timeout=60)

    # Postconditions: it exits 1 saying why, the drop is still in the inbox, one copy was made.
    assert code == 1, daemon.log[-3000:]
    assert "ALARM: the database refuses writes" in daemon.log and "serve --once" in daemon.log
    assert (folders.inbox / "kept" / "job.json").exists()
    assert len(list((folders.work / "jobs").iterdir())) == 1

    # Once the database accepts writes, the same copy becomes the job.
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert "using the copy" in result.stderr
    assert folders.job_states() == {"kept": "done"}


def test_a_database_that_refuses_writes_pauses_ingest_with_an_alarm_and_it_resumes(folders: Folders):
    assert folders.run("serve", "--once").returncode == 0
    daemon = None
    try:
        with read_only(folders.state) as refused:
            if not refused:
                pytest.skip("this machine cannot make a file read-only for root (chattr +i refused)")
            daemon = folders.serve()
            daemon.wait_ready()
            folders.drop("paused", tiny_job())
            daemon.wait_for(lambda: "ALARM: the database refuses writes" in daemon.log, what="the alarm")
            daemon.wait_for(lambda: "still refuses" in daemon.log, what="a second attempt")
            assert len(list((folders.work / "jobs").iterdir())) == 1
            assert (folders.inbox / "paused" / "job.json").exists()
        # The file accepts writes again.
        daemon.wait_for(lambda: folders.job_states().get("paused") == "done", timeout=120,
                        what="the job, once the database accepts writes")
        assert daemon.stop() == 0
    finally:
        if daemon is not None and daemon.alive():
            daemon.kill()
    assert any("accepts writes again" in m and "readonly" in m for m in alarms(folders))
    assert len(list((folders.work / "jobs").iterdir())) <= 1


# Two daemons on one inbox ----------------------------------------------------------------------

def test_a_second_daemon_with_its_own_work_folder_and_database_refuses_to_serve_the_same_inbox(
        folders: Folders, tmp_path: Path):
    other = Folders(tmp_path / "other")
    with folders.serve() as first:
        first.wait_ready()
        with other.serve(QIE_INBOX=str(folders.inbox)) as second:
            assert second.wait_exit(timeout=60) == 1
        assert "serves the inbox" in second.log and f"pid {first.process.pid} on" in second.log
        assert str(folders.work) in second.log
        assert first.stop() == 0
    folders.drop("after", tiny_job())
    assert other.run("serve", "--once", QIE_INBOX=str(folders.inbox)).returncode == 0
    assert other.job_states() == {"after": "done"}


def test_the_inbox_lease_is_a_plain_file_that_expires_when_its_holder_stops_refreshing_it(folders: Folders):
    # Preconditions: a lease of a daemon on another machine (a file on a share: no flock).
    lease = folders.inbox / ".qie-hotfolder.lease"
    lease.write_text(json.dumps({"token": "t", "pid": 4242, "host": "nas-client-7", "work": "/srv/qie/work",
                                 "database": "sqlite"}))
    folders.drop("after", tiny_job())
    refused = folders.run("serve", "--once")
    assert refused.returncode == 1 and "pid 4242 on nas-client-7" in refused.stderr
    # Action: it has not been refreshed for an hour.
    an_hour_ago = time.time() - 3600
    os.utime(lease, (an_hour_ago, an_hour_ago))
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert "taking over the inbox" in result.stderr
    assert folders.job_states() == {"after": "done"}
    assert not lease.exists()  # released at a clean stop


# A watch that goes deaf ------------------------------------------------------------------------

def test_an_inbox_that_is_a_symbolic_link_hears_events(folders: Folders, tmp_path: Path):
    real = tmp_path / "real-inbox"
    folders.inbox.rmdir()
    real.mkdir()
    folders.inbox.symlink_to(real)
    folders.drop("first", tiny_job(seed=1))  # found by the start-up scan
    with folders.serve(QIE_RESCAN_INTERVAL="600") as daemon:
        daemon.wait_for(lambda: folders.job_states().get("first") == "done", what="the first job")
        folders.drop("second", tiny_job(seed=2))  # only an event can tell (no rescan for 600 s)
        daemon.wait_for(lambda: (folders.outbox / "second.png").exists(), timeout=30, what="the second job")
        assert daemon.stop() == 0
    assert f"through the link to {real}" in daemon.log


def test_an_inbox_moved_away_and_made_again_raises_an_alarm_and_is_watched_again(folders: Folders):
    with folders.serve(QIE_RESCAN_INTERVAL="600") as daemon:
        daemon.wait_ready()
        folders.drop("first", tiny_job(seed=1))
        daemon.wait_for(lambda: folders.job_states().get("first") == "done", what="the first job")
        folders.inbox.rename(folders.root / "inbox.old")
        folders.inbox.mkdir()
        daemon.wait_for(lambda: any("inbox" in m for m in alarms(folders)), what="the alarm")
        folders.drop("second", tiny_job(seed=2))
        daemon.wait_for(lambda: (folders.outbox / "second.png").exists(), timeout=30, what="the job in the new inbox")
        assert daemon.stop() == 0
    assert any("no longer the folder that was watched" in m or "is missing" in m for m in alarms(folders))


# Jobs that take each other's files -------------------------------------------------------------

def test_a_job_never_takes_a_file_another_job_or_a_preset_still_needs(folders: Folders):
    # Preconditions: a preset with a shared reference; a job file borrowing that reference; two
    # job files naming one photo; a job file naming a file of a job folder.
    winter = folders.inbox / "winter"
    make_image(winter / "style.png", colour=(250, 250, 250))
    (winter / "preset.json").write_text(json.dumps({"prompt": "winter", "megapixels": 0.004, "image2": "style.png"}))
    make_image(folders.inbox / "mine.png")
    (folders.inbox / "borrow.json").write_text(json.dumps(tiny_job(image1="mine.png", image2="winter/style.png")))
    make_image(folders.inbox / "shared.png", colour=(10, 20, 200))
    (folders.inbox / "one.json").write_text(json.dumps(tiny_job(image1="shared.png", seed=1)))
    (folders.inbox / "two.json").write_text(json.dumps(tiny_job(image1="shared.png", seed=2)))
    folders.drop("owner", tiny_job())
    (folders.inbox / "steal.json").write_text(json.dumps(tiny_job(image1="owner/photo.png")))

    result = folders.run("serve", "--once")

    # Postconditions: the reference stays with its preset, both jobs naming one photo ran with
    # it (and it left the inbox with the last), the job folder kept its photo, and the job
    # file naming it failed at once, naming the owner.
    assert result.returncode == 0, result.stderr
    assert folders.job_states() == {"borrow": "done", "one": "done", "two": "done", "owner": "done"}
    assert sorted(p.name for p in winter.iterdir()) == ["preset.json", "style.png"]
    assert input_sha(folders, folders.db_rows("SELECT id FROM jobs WHERE name = 'one'")[0][0], "shared.png") == \
        input_sha(folders, folders.db_rows("SELECT id FROM jobs WHERE name = 'two'")[0][0], "shared.png")
    assert sorted(p.name for p in folders.inbox.iterdir()) == ["winter"]
    report = errors(folders)["steal"]
    assert report["field"] == "image1" and "belongs to the job folder 'owner'" in report["error"]
    assert report["files"] == ["steal.json"]


def test_a_pipe_a_folder_or_a_differently_normalised_name_at_an_image_path_gets_an_answer_at_once(folders: Folders):
    piped = folders.inbox / "piped"
    piped.mkdir()
    os.mkfifo(piped / "photo.png")
    (piped / "job.json").write_text(json.dumps(tiny_job()))
    (folders.inbox / "folder.png").mkdir()
    (folders.inbox / "dir.json").write_text(json.dumps(tiny_job(image1="folder.png")))
    accent = folders.inbox / "accent"
    make_image(accent / unicodedata.normalize("NFD", "café.png"))  # as macOS and SMB clients write it
    (accent / "job.json").write_text(json.dumps(tiny_job(image1=unicodedata.normalize("NFC", "café.png"))))

    result = folders.run("serve", "--once")  # the missing-file timeout is an hour: none of them waits

    assert result.returncode == 0, result.stderr
    reports = errors(folders)
    assert reports["piped"]["field"] == "image1" and "'photo.png' is a named pipe (FIFO)" in reports["piped"]["error"]
    assert reports["dir"]["field"] == "image1" and "'folder.png' is a folder" in reports["dir"]["error"]
    assert folders.job_states() == {"accent": "done"}


# A waiting job's cost --------------------------------------------------------------------------

IN_OPEN, IN_ISDIR, IN_NONBLOCK = 0x20, 0x40000000, 0o4000


class DirectoryOpens:
    """Counts how often a folder is opened (listed), through inotify."""

    def __init__(self, folder: Path):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0 and self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN) >= 0

    def count(self) -> int:
        opens = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return opens
            offset = 0
            while offset < len(data):
                mask, name_length = int.from_bytes(data[offset + 4:offset + 8], "little"), \
                    int.from_bytes(data[offset + 12:offset + 16], "little")
                opens += bool(mask & IN_OPEN and mask & IN_ISDIR)
                offset += 16 + name_length

    def close(self) -> None:
        os.close(self.fd)


def test_a_job_folder_waiting_for_a_missing_image_is_not_listed_again_and_again(folders: Folders):
    # Preconditions: a job folder of 2,000 files whose image has not arrived.
    staging = folders.root / "staging"
    staging.mkdir()
    for i in range(2000):
        (staging / f"page-{i:04}.txt").write_text("x")
    (staging / "job.json").write_text(json.dumps(tiny_job(image1="late.png")))
    staging.rename(folders.inbox / "big")
    with folders.serve() as daemon:
        daemon.wait_for(lambda: "waiting for image1" in daemon.log, what="the job waiting")
        opens = DirectoryOpens(folders.inbox / "big")
        try:
            # Action: it waits 3 s (some 20 passes of the ingest loop), then the image arrives.
            time.sleep(3)
            listed = opens.count()
        finally:
            opens.close()
        make_image(folders.root / "late.png").rename(folders.inbox / "big" / "late.png")
        daemon.wait_for(lambda: folders.job_states().get("big") == "done", what="the job once its image is there")
        assert daemon.stop() == 0
    # Postconditions: while it waited its folder was not listed (before: twice a pass).
    assert listed == 0


def test_two_jobs_naming_one_photo_each_have_their_own_proportions_checked(folders: Folders):
    # The photo decodes once (for "fine", first by name); "wide"'s custom output size (64:1) is still checked.
    make_image(folders.inbox / "shared.png", colour=(10, 20, 200))
    (folders.inbox / "fine.json").write_text(json.dumps(tiny_job(image1="shared.png", seed=1)))
    (folders.inbox / "wide.json").write_text(json.dumps(tiny_job(image1="shared.png", seed=2, width=4096,
                                                                   height=64)))

    result = folders.run("serve", "--once")

    assert result.returncode == 0, result.stderr
    assert folders.job_states() == {"fine": "done"}
    report = errors(folders)["wide"]
    assert report["stage"] == "ingest" and report["field"] == "width" and "64:1" in report["error"], report
