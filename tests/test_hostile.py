"""What a hostile tester tried against the real daemon, and what it does now (docs/reliability.md,
"Hostile tester findings"). Each test drives the real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Folders, make_image, tiny_job


def report(folders: Folders, name: str) -> dict:
    return json.loads((folders.failed / f"{name}.error.json").read_text())


# 1. A published output is never replaced ---------------------------------------------------------

def test_a_retried_publish_never_replaces_an_output_published_meanwhile(folders: Folders):
    # Preconditions: two jobs ask for the same output name; the first one's publish fails once
    # (the outbox was full) and is retried after the second has published.
    folders.drop("a", tiny_job(seed=1, output_name="same"))
    folders.drop("b", tiny_job(seed=2, output_name="same"))

    result = folders.run("serve", "--once", QIE_FAULTS="publish.write@1=enospc", QIE_RETRY_BACKOFF="0.5")

    # Postconditions: both outputs exist under names of their own, each as its job published it.
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folders.outbox.iterdir()) == ["same-1.json", "same-1.png", "same.json", "same.png"]
    by_job = {}
    for manifest_path in folders.outbox.glob("*.json"):
        manifest = json.loads(manifest_path.read_text())
        image = folders.outbox / manifest["output"]["file"]
        assert hashlib.sha256(image.read_bytes()).hexdigest() == manifest["output"]["sha256"]
        by_job[manifest["job"]["name"]] = image.name
    assert by_job == {"b": "same.png", "a": "same-1.png"} or by_job == {"a": "same.png", "b": "same-1.png"}
    assert folders.job_states() == {"a": "done", "b": "done"}


def test_a_file_that_appears_under_the_reserved_name_is_left_alone(folders: Folders):
    folders.drop("photo", tiny_job(seed=3))
    with folders.serve(QIE_FAULTS="publish.write=pause:2") as daemon:
        daemon.wait_for(lambda: folders.db_rows("SELECT output_name FROM jobs WHERE output_name = 'photo'"),
                        what="the name reserved")
        (folders.outbox / "photo.png").write_bytes(b"someone else's file")
        daemon.wait_for(lambda: folders.job_states().get("photo") == "done", what="the job done")
        assert daemon.stop() == 0
    assert (folders.outbox / "photo.png").read_bytes() == b"someone else's file"
    assert json.loads((folders.outbox / "photo-1.json").read_text())["output"]["file"] == "photo-1.png"


# 3. Copies carry no special mode bits; the state is private ----------------------------------------

def test_copies_never_carry_set_user_id_bits_and_the_state_is_private(folders: Folders):
    folders.drop("tool", tiny_job())
    helper = folders.inbox / "tool" / "helper"
    helper.write_bytes(b"#!/bin/sh\n")
    helper.chmod(0o4755)
    broken = folders.inbox / "broken"
    broken.mkdir()
    (broken / "job.json").write_text("{not json")
    (broken / "evil").write_bytes(b"x")
    (broken / "evil").chmod(0o6755)

    result = folders.run("serve", "--once")

    assert result.returncode == 0, result.stderr
    archived = next(folders.archive.glob("*-tool")) / "helper"
    assert stat.S_IMODE(archived.stat().st_mode) & 0o7000 == 0
    assert stat.S_IMODE((folders.failed / "broken" / "evil").stat().st_mode) & 0o7000 == 0
    for private in (folders.state, folders.work):
        assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, f"{private} is readable by others"


# 5. Untrusted text reaches neither log lines nor terminals raw --------------------------------------

def test_control_characters_in_names_and_prompts_never_reach_logs_or_terminals_raw(folders: Folders):
    forged = "x\n2026-01-01 00:00:00,000 INFO    processor.daemon: forged\x1b]0;owned\x07"
    folders.drop("named", tiny_job(seed=4))
    (folders.inbox / "named").rename(folders.inbox / forged)
    folders.drop("prompted", tiny_job(seed=5, prompt="clear\x1b[2J\x1b]0;owned\x07 the screen\x00"))

    with folders.serve() as daemon:
        daemon.wait_for(lambda: folders.job_states().get("prompted") == "done", what="the job with the prompt")
        daemon.wait_for(lambda: list(folders.failed.glob("*.error.json")), what="the bad name refused")
        assert daemon.stop() == 0

    log = daemon.log
    assert "\x1b" not in log and "\x00" not in log and "\x07" not in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), "a log line was forged"
    [rejected] = list(folders.failed.glob("*.error.json"))
    assert "control characters" in json.loads(rejected.read_text())["error"]
    for command in (("status",), ("show", "1")):
        shown = folders.run(*command).stdout
        assert "\x1b" not in shown and "\x00" not in shown
    assert "clear\\x1b[2J" in folders.run("show", "1").stdout


# 6. Error reports name folders, not this machine's paths -----------------------------------------------

def test_an_error_report_shows_folders_users_know_not_server_paths(diffusers_folders: Folders):
    folders = diffusers_folders
    folders.drop("lora", tiny_job(lora="missing.safetensors"))
    assert folders.run("serve", "--once").returncode == 0
    error = report(folders, "lora")["error"]
    assert str(folders.root) not in error and str(folders.model) not in error
    assert "<LoRA folder>/missing.safetensors" in error
    assert report(folders, "lora")["kind"] == "permanent"
    assert str(folders.root) not in folders.run("status").stdout


# 7. A full disk is an alarm and a pause, never an exit ---------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB file system of its own (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_work_disk_pauses_ingest_with_an_alarm_and_the_daemon_lives_on(tmp_path, small_disk):
    folders = Folders(tmp_path / "f", env_extra={"QIE_WORK": str(small_disk / "work")})
    filler = small_disk / "filler"
    with folders.serve() as daemon:
        daemon.wait_ready()
        with open(filler, "wb") as handle:  # the disk fills up while the daemon runs
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError:
                pass
        folders.drop("waits", tiny_job(seed=6))
        daemon.wait_for(lambda: "No space left on device" in daemon.log, what="the full disk noticed")
        time.sleep(2.5)
        assert daemon.alive() and folders.job_states() == {}
        filler.unlink()
        daemon.wait_for(lambda: folders.job_states().get("waits") == "done", what="the job after space came back")
        assert daemon.stop() == 0


def test_a_status_file_that_cannot_be_written_stops_nothing(folders: Folders):
    folders.drop("fine", tiny_job(seed=7))
    with folders.serve(QIE_FAULTS="status.write@1+=enospc") as daemon:
        daemon.wait_for(lambda: folders.job_states().get("fine") == "done", what="the job")
        time.sleep(1.5)
        assert daemon.alive()
        assert daemon.stop() == 0


# 9. Long names are refused at ingest, never after the compute ---------------------------------------------

def test_names_too_long_for_their_outputs_are_refused_at_ingest_naming_the_limit(folders: Folders):
    long_folder = "n" * 230
    folders.drop(long_folder, tiny_job(seed=8))
    folders.drop("accented", tiny_job(seed=9, output_name="é" * 150))
    folders.drop("fine", tiny_job(seed=10))

    result = folders.run("serve", "--once")

    assert result.returncode == 0, result.stderr
    assert folders.job_states() == {"fine": "done"}
    errors = {p.name: json.loads(p.read_text()) for p in folders.failed.glob("*.error.json")}
    assert {e["field"] for e in errors.values()} == {None, "output_name"}
    assert all("at most 200 bytes" in e["error"] for e in errors.values())
    assert all(len(name.encode()) <= 255 for name in os.listdir(folders.failed))


# 10. A damaged database: one clear sentence and a status the unit does not restart on -----------------------

def test_a_damaged_database_stops_the_daemon_with_one_clear_message_and_status_3(folders: Folders):
    folders.state.write_bytes(b"this is not a database, it is garbage" * 100)
    for command in (("serve", "--once"), ("status",)):
        result = folders.run(*command)
        assert result.returncode == 3, (command, result.stderr)
        assert "damaged" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2


def test_a_database_of_a_newer_version_is_not_told_to_upgrade(folders: Folders):
    assert folders.run("db-upgrade").returncode == 0
    with sqlite3.connect(folders.state) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    result = folders.run("serve", "--once")
    assert result.returncode == 3
    assert "newer version" in result.stderr and "db-upgrade" not in result.stderr


# 11, 12. SIGHUP and SIGTERM stop at a checkpoint that the next start resumes from ---------------------------

@pytest.mark.parametrize("signal_name, exit_status", [("SIGTERM", 0), ("SIGHUP", 75)])
def test_a_signal_during_sampling_leaves_a_resumable_checkpoint_even_between_partials(
        folders: Folders, tmp_path, signal_name, exit_status):
    reference = Folders(tmp_path / "reference")
    reference.drop("edit", tiny_job(seed=5, steps=6))
    assert reference.run("serve", "--once").returncode == 0

    # No partial is due for ten minutes; the signal arrives after sampling step 3.
    folders.drop("edit", tiny_job(seed=5, steps=6))
    with folders.serve(QIE_FAULTS="stage.sample.step3=pause:2", QIE_PARTIAL_INTERVAL="600") as daemon:
        daemon.wait_for(lambda: folders.db_rows("SELECT step FROM jobs WHERE stage = 'sample' AND step >= 3"),
                        what="sampling step 3")
        daemon.process.send_signal(getattr(signal, signal_name))
        assert daemon.wait_exit(timeout=60) == exit_status

    assert folders.db_rows("SELECT state, crashes FROM jobs") == [("queued", 0)]
    assert folders.db_rows("SELECT fingerprint FROM checkpoints WHERE fingerprint LIKE '%.step3'")
    assert folders.run("serve", "--once").returncode == 0
    assert (folders.outbox / "edit.png").read_bytes() == (reference.outbox / "edit.png").read_bytes()
    assert folders.db_rows("SELECT resumed_from_step FROM stage_runs WHERE stage = 'sample' AND error IS NULL") == [(3,)]


# 17. A retried job leaves no stale report behind ---------------------------------------------------------

def test_retrying_a_failed_job_clears_its_report_and_its_old_error(folders: Folders):
    folders.drop("flaky", tiny_job(seed=11))
    failing = folders.run("serve", "--once", QIE_FAULTS="publish.write@1+=enospc", QIE_MAX_ATTEMPTS="1")
    assert failing.returncode == 0, failing.stderr
    assert report(folders, "flaky")["kind"] == "transient"
    assert (folders.failed / "flaky").is_dir()

    assert folders.run("retry", "1").returncode == 0
    assert list(folders.failed.iterdir()) == []

    assert folders.run("serve", "--once").returncode == 0
    [job] = json.loads(folders.run("status", "--json").stdout)["jobs"]
    assert (job["state"], job["error"]) == ("done", "")
    assert list(folders.failed.iterdir()) == []
