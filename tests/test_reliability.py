"""Losing nothing: crashes, poison jobs, network-share behaviour, full disks, hostile inputs.

All through the real daemon process, the real SQLite file and the real tiny model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
from tests.daemon import Folders, make_image, tiny_job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crash import run_campaign  # noqa: E402


def errors(folders: Folders) -> dict[str, dict]:
    return {p.name[:-len(".error.json")]: json.loads(p.read_text()) for p in folders.failed.glob("*.error.json")}


# 1. Crashes ------------------------------------------------------------------------------------

def test_sigkills_at_random_moments_lose_nothing_and_change_nothing(tmp_path):
    campaign = run_campaign(tmp_path, None, kills=8, seed=11)
    assert campaign.problems == []
    assert sum(campaign.kills.values()) == 8


# 2. Poison jobs --------------------------------------------------------------------------------

def test_a_job_that_kills_the_process_every_time_is_failed_and_the_others_complete(folders: Folders):
    folders.drop("poison", tiny_job(seed=1))
    folders.drop("fine", tiny_job(seed=2))
    for _ in range(5):
        # Sampling steps of 0.1 s: the stage is recorded before the process dies in it.
        result = folders.run("serve", "--once", QIE_FAULTS="job.poison.stage.sample.step1", QIE_MAX_CRASHES="3",
                             QIE_FAKE__UNIT_SECONDS="0.4")
        if result.returncode == 0:
            break
    assert dict(folders.db_rows("SELECT name, state FROM jobs")) == {"poison": "failed", "fine": "done"}
    error = folders.db_rows("SELECT error FROM jobs WHERE name = 'poison'")[0][0]
    assert "died 3 times" in error and "sample" in error
    assert (folders.outbox / "fine.png").exists()


# 3. Network shares -----------------------------------------------------------------------------

def test_a_job_file_that_arrives_before_its_images_waits_for_them(folders: Folders):
    with folders.serve() as daemon:
        daemon.wait_ready()
        (folders.inbox / "early.json").write_text(json.dumps(tiny_job(image1="late.png")))
        time.sleep(2.0)
        assert folders.job_states() == {}
        make_image(folders.root / "late.png").rename(folders.inbox / "late.png")  # renamed into place
        daemon.wait_for(lambda: (folders.outbox / "early.png").exists(), what="the output")
        assert daemon.stop() == 0
    assert "waiting for image1 (late.png)" in daemon.log


def test_a_missing_image_fails_the_job_after_the_timeout_naming_the_file(folders: Folders):
    (folders.inbox / "lonely.json").write_text(json.dumps(tiny_job(image1="never.png")))
    with folders.serve(QIE_MISSING_FILE_TIMEOUT="2") as daemon:
        daemon.wait_for(lambda: (folders.failed / "lonely.error.json").exists(), what="the failure")
        assert daemon.stop() == 0
    report = errors(folders)["lonely"]
    assert report["field"] == "image1" and "never.png" in report["error"] and "did not appear" in report["error"]


def test_polling_mode_picks_up_jobs_on_a_share_without_events(folders: Folders):
    with folders.serve("--polling") as daemon:
        daemon.wait_for(lambda: "polling" in daemon.log, what="start-up in polling mode")
        folders.drop("polled", tiny_job())
        daemon.wait_for(lambda: (folders.outbox / "polled.png").exists(), what="the output")
        assert daemon.stop() == 0


def test_an_inbox_that_disappears_raises_an_alarm_and_nothing_is_failed_or_deleted(folders: Folders):
    folders.drop("kept", tiny_job(), images={"photo.png": (64, 64)})
    unmounted = folders.root / "inbox-unmounted"
    with folders.serve(QIE_RESCAN_INTERVAL="0.5") as daemon:
        daemon.wait_for(lambda: folders.job_states().get("kept") == "done", what="the first job")
        folders.inbox.rename(unmounted)
        daemon.wait_for(lambda: "inbox" in daemon.log and "missing" in daemon.log, what="the alarm")
        status = folders.run("status")
        assert "ALARM" in status.stdout and "missing" in status.stdout
        (unmounted / "back").mkdir()
        make_image(unmounted / "back" / "photo.png")
        (unmounted / "back" / "job.json").write_text(json.dumps(tiny_job(seed=9)))
        time.sleep(1.5)
        assert list(folders.failed.iterdir()) == []
        unmounted.rename(folders.inbox)  # the share is back, with a job dropped meanwhile
        daemon.wait_for(lambda: (folders.outbox / "back.png").exists(), what="the job dropped while away")
        assert daemon.stop() == 0
    assert "is back" in daemon.log


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_image_waits_and_is_reported(folders: Folders):
    folders.drop("locked", tiny_job())
    (folders.inbox / "locked" / "photo.png").chmod(0)
    with folders.serve(QIE_CORRUPT_GRACE_SECONDS="1") as daemon:
        daemon.wait_for(lambda: errors(folders).get("locked"), what="the failure")
        assert daemon.stop() == 0


# 4. Disk full and I/O errors -------------------------------------------------------------------

def test_a_full_disk_while_writing_checkpoints_does_not_stop_the_job(folders: Folders, tmp_path):
    # Preconditions: the same job, uninterrupted, for reference.
    reference = Folders(tmp_path / "reference", folders.model)
    reference.drop("full", tiny_job())
    assert reference.run("serve", "--once").returncode == 0

    # Action: the work disk is full for two checkpoint writes.
    folders.drop("full", tiny_job())
    with folders.serve(QIE_FAULTS="checkpoint.write@2-3=enospc", QIE_RETRY_BACKOFF="0.5") as daemon:
        daemon.wait_for(lambda: (folders.outbox / "full.png").exists(), what="the output")
        assert daemon.stop() == 0

    # Postconditions: the results stayed in memory, so the job went on and gave the same bytes;
    # the two stages whose checkpoints could not be written say so, and nothing was left behind.
    assert (folders.outbox / "full.png").read_bytes() == (reference.outbox / "full.png").read_bytes()
    assert json.loads((folders.outbox / "full.json").read_text())["job"]["attempts"] == 0
    events = [m for (m,) in folders.db_rows("SELECT message FROM events WHERE kind = 'checkpoint'")]
    assert len(events) == 2 and all("No space left on device" in m for m in events)
    assert len(folders.db_rows("SELECT id FROM stage_runs WHERE error LIKE '%No space left%'")) == 2
    leftovers = [p for p in (folders.work / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_disk_that_stays_full_fails_the_job_after_max_attempts_as_transient(folders: Folders):
    folders.drop("never", tiny_job())
    result = folders.run("serve", "--once", QIE_FAULTS="publish.write@1+=enospc", QIE_RETRY_BACKOFF="0.2",
                         QIE_MAX_ATTEMPTS="3")
    assert result.returncode == 0, result.stderr
    report = errors(folders)["never"]
    assert report["kind"] == "transient" and report["attempts"] == 3
    assert "gave up after 3 attempts" in report["error"] and "No space left" in report["error"]
    assert sorted(os.listdir(folders.failed / "never")) == ["job.json", "photo.png"]
    assert [p.name for p in folders.outbox.iterdir()] == []


def test_a_checkpoint_corrupted_on_disk_is_detected_and_recomputed(folders: Folders):
    folders.drop("first", tiny_job(seed=1))
    assert folders.run("serve", "--once").returncode == 0
    [(path,)] = folders.db_rows("SELECT path FROM checkpoints WHERE stage = 'encode_text'")
    data = bytearray(Path(path).read_bytes())
    data[-10] ^= 0xFF
    Path(path).write_bytes(bytes(data))

    folders.drop("second", tiny_job(seed=2))  # same image and prompt: would reuse encode_text
    assert folders.run("serve", "--once").returncode == 0
    runs = {stage: hit for stage, hit, _, _ in folders.stage_runs(2)}
    assert runs["encode_text"] == 0 and runs["prepare"] == 1
    [(message,)] = folders.db_rows("SELECT message FROM events WHERE kind = 'checkpoint'")
    assert "encode_text" in message and "sha256" in message


# 5. Hostile and broken inputs ------------------------------------------------------------------

def write_bomb(path: Path, side: int = 30000) -> None:
    """A few hundred bytes of PNG that decompress to ``side`` x ``side`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + b"\0" * (side // 8)
    pixels = zlib.compress(row * 64, 9)  # the first rows only: the header is what counts
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_hostile_and_broken_inputs_each_land_in_failed_naming_the_problem(folders: Folders, tmp_path):
    inbox = folders.inbox
    outside = tmp_path / "secret.png"
    make_image(outside)

    def job_folder(name: str, job: dict, files: dict[str, bytes | None] | None = None) -> None:
        staging = folders.root / f"staging-{name}"
        staging.mkdir()
        for file_name, data in (files or {}).items():
            target = staging / file_name
            if data is None:
                make_image(target)
            else:
                target.write_bytes(data)
        (staging / "job.json").write_text(json.dumps(job))
        staging.rename(inbox / name)

    png = make_image(tmp_path / "ok.png").read_bytes()
    (inbox / "badjson.json").write_text("{ not json")
    (inbox / "nonutf8.json").write_bytes(b'{"prompt": "\xff\xfe"}')
    (inbox / "list.json").write_text("[1, 2, 3]")
    (inbox / "huge.json").write_text(json.dumps(tiny_job(prompt="x" * 2_000_000)))
    job_folder("types", tiny_job(steps="four"), {"photo.png": None})
    job_folder("unknown", tiny_job(colour="blue"), {"photo.png": None})
    job_folder("textfile", tiny_job(), {"photo.png": b"this is not an image\n" * 10})
    job_folder("truncated", tiny_job(), {"photo.png": png[: len(png) // 2]})
    job_folder("empty", tiny_job(), {"photo.png": b""})
    job_folder("traversal", tiny_job(image1="../../secret.png"), {})
    job_folder("absolute", tiny_job(image1=str(outside)), {})
    job_folder("symlink", tiny_job(), {})
    os.symlink(outside, inbox / "symlink" / "photo.png")
    bomb = tmp_path / "bomb.png"
    write_bomb(bomb)
    job_folder("bomb", tiny_job(), {"photo.png": bomb.read_bytes()})
    job_folder("unicode ünïcødé név", tiny_job(image1="фото 1.png"), {"фото 1.png": None})
    (inbox / os.fsdecode(b"latin1-\xe9t\xe9.json")).write_text(json.dumps(tiny_job(image1="photo-l1.png")))
    make_image(inbox / "photo-l1.png")
    job_folder("clash-a", tiny_job(output_name="same"), {"photo.png": None})
    job_folder("clash-b", tiny_job(output_name="same", seed=99), {"photo.png": None})

    with folders.serve(QIE_CORRUPT_GRACE_SECONDS="1", QIE_MAX_JOB_FILE_BYTES="100000") as daemon:
        daemon.wait_for(lambda: len(errors(folders)) >= 13 and len(list(folders.outbox.glob("*.png"))) >= 4,
                        timeout=120, what="every drop handled")
        assert daemon.alive()
        assert daemon.stop() == 0

    reports = errors(folders)
    expected = {
        "badjson": (None, "invalid JSON"), "nonutf8": (None, "not UTF-8"), "list": (None, "JSON object"),
        "huge": (None, "max_job_file_bytes"), "types": ("steps", "integer"), "unknown": ("colour", "unknown key"),
        "textfile": ("image1", "not an image"), "truncated": ("image1", "truncated"),
        "empty": ("image1", "empty"), "traversal": ("image1", "'..'"), "absolute": ("image1", "absolute"),
        "symlink": ("image1", "link leading out"), "bomb": ("image1", "max_image_pixels"),
    }
    for name, (field, words) in expected.items():
        assert name in reports, f"{name} not in failed/: {sorted(reports)}"
        assert reports[name]["field"] == field, (name, reports[name])
        assert words in reports[name]["error"], (name, reports[name]["error"])
    # Originals are kept beside each report; the symlink is not followed out of the inbox.
    assert (folders.failed / "truncated" / "photo.png").read_bytes() == png[: len(png) // 2]
    assert not (folders.failed / "symlink" / "photo.png").exists() or (folders.failed / "symlink" / "photo.png").is_symlink()
    # Unusual names work; clashing output names get a suffix instead of an overwrite.
    published = sorted(p.name for p in folders.outbox.glob("*.png"))
    assert "unicode ünïcødé név.png" in published and "same.png" in published and "same-1.png" in published
    assert "latin1-\ufffdt\ufffd.png" in published  # undecodable bytes in a name are replaced
    assert outside.exists()
    assert [p.name for p in folders.inbox.iterdir()] == []
