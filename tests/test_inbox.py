"""The inbox contract: what is a job, when it is ready, where its paths may point."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
from watchdog.events import DirCreatedEvent

from config import JobFileError, load_settings
from db import Database
from processor.inbox import SettleTracker, find_candidates, is_ignored, resolve_inside, unique_path
from processor.ingest import Ingestor
from processor.watch import _Wake
from tests.daemon import make_image, tiny_job


@pytest.mark.parametrize("name", [".hidden.json", "photo.png.part", "job.json.tmp", "x.crdownload",
                                  "a.json.!sync", "backup~", "~$lock.json", "Thumbs.db"])
def test_temporary_and_hidden_names_are_ignored(name):
    assert is_ignored(name)


def test_job_files_and_job_folders_are_found_and_other_things_are_not(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / ".b.json").write_text("{}")
    (tmp_path / "c.json.part").write_text("{}")
    (tmp_path / "photo.png").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "job.json").write_text("{}")
    (tmp_path / "no-job-yet").mkdir()
    found = find_candidates(tmp_path)
    assert [(c.name, c.source, c.is_folder) for c in found] == [("a", "a.json", False),
                                                                 ("folder", "folder/job.json", True)]


def test_paths_leading_out_of_the_job_folder_are_refused(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", job / "link.png")
    for relative, words in (("../secret.png", "'..'"), ("/etc/passwd", "absolute"),
                            ("link.png", "link leading out"), (".hidden.png", "hidden")):
        with pytest.raises(JobFileError, match=words) as caught:
            resolve_inside(job, relative, "job/job.json", "image1")
        assert caught.value.field == "image1"
    assert resolve_inside(job, "sub/ok.png", "job/job.json", "image1") == job / "sub" / "ok.png"


def test_a_file_is_settled_only_after_it_stopped_changing_for_the_settle_time(tmp_path):
    path = tmp_path / "f"
    sizes = iter([(1, 1), (2, 2), (2, 2), (2, 2)])
    tracker = SettleTracker(2.0, stat=lambda p: next(sizes))
    assert not tracker.settled(path, now=0.0)   # first sight
    assert not tracker.settled(path, now=1.0)   # grew
    assert not tracker.settled(path, now=2.5)   # unchanged for 1.5 s
    assert tracker.settled(path, now=3.0)       # unchanged for 2 s


def test_files_written_into_a_new_folder_before_its_watch_count_as_closed(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"x")
    (folder / "job.json").write_text("{}")
    tracker = SettleTracker(2.0, settle_after_close=0.5)
    _Wake(threading.Event(), tracker.saw_close).dispatch(DirCreatedEvent(str(folder)))
    (folder / "job.json").write_text('{"prompt": "still writing"}')
    later = time.monotonic() + 0.5
    assert tracker.settled(folder / "photo.png", now=later)
    assert not tracker.settled(folder / "job.json", now=later)  # written after: its hint is void


def test_a_missing_file_is_never_settled(tmp_path):
    assert not SettleTracker(0).settled(tmp_path / "nothing", now=0.0)


def test_name_clashes_get_a_suffix(tmp_path):
    (tmp_path / "out.png").write_bytes(b"x")
    (tmp_path / "out-1.json").write_bytes(b"x")
    assert unique_path(tmp_path, "out", (".png", ".json"))[1] == "out-2"
    assert unique_path(tmp_path, "new", (".png", ".json"))[1] == "new"


def test_the_files_of_a_job_folder_settle_together_not_one_after_another(tmp_path):
    settings = load_settings(None, inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", failed=tmp_path / "failed",
                             archive=tmp_path / "archive", work=tmp_path / "work", state=tmp_path / "state.db",
                             settle_seconds=2.0)
    folder = settings.inbox / "drop"
    folder.mkdir(parents=True)
    make_image(folder / "photo.png")
    (folder / "job.json").write_text(json.dumps(tiny_job()))
    ingestor = Ingestor(settings, Database(f"sqlite:///{settings.state}"))
    assert ingestor.scan(now=100.0).ingested == []  # first sight of every file
    assert ingestor.scan(now=101.0).ingested == []
    assert len(ingestor.scan(now=102.0).ingested) == 1  # one settle time, not two


def test_postgresql_daemons_share_the_inbox_lease_and_an_sqlite_daemon_shares_it_with_none(tmp_path):
    from processor.inbox_lease import AlreadyRunning, InboxLease
    first, second = (InboxLease(tmp_path, tmp_path / f"work-{n}", shared=True) for n in (1, 2))
    first.acquire()
    second.acquire()  # PostgreSQL daemons share one queue: they may share the inbox
    with pytest.raises(AlreadyRunning, match="postgresql database"):
        InboxLease(tmp_path, tmp_path / "work-3", shared=False).acquire()
    second.release()  # a daemon that joined leaves the lease to the others
    assert (tmp_path / ".qie-hotfolder.lease").exists()
    first.release()  # the one that made it removes it
    alone = InboxLease(tmp_path, tmp_path / "work-4", shared=False)
    alone.acquire()
    with pytest.raises(AlreadyRunning, match="sqlite database"):
        InboxLease(tmp_path, tmp_path / "work-5", shared=True).acquire()
    alone.release()
    assert not (tmp_path / ".qie-hotfolder.lease").exists()


def test_a_daemon_whose_inbox_lease_was_taken_over_knows_it(tmp_path):
    from processor.inbox_lease import InboxLease
    stalled = InboxLease(tmp_path, tmp_path / "work-1", shared=False, stale_seconds=-1.0)
    stalled.acquire()
    newcomer = InboxLease(tmp_path, tmp_path / "work-2", shared=False, stale_seconds=-1.0)
    newcomer.acquire()  # the first one's lease looked abandoned
    stalled.refresh()
    newcomer.refresh()
    assert stalled.lost is not None and "took over the inbox" in stalled.lost
    assert newcomer.lost is None
    for lease in (stalled, newcomer):
        lease.release()
