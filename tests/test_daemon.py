"""The daemon end to end, through the real process: real watchdog observer, real SQLite file,
real tiny model."""

from __future__ import annotations

import json
import time

from PIL import Image

from tests.daemon import Folders, make_image, tiny_job


def outputs(folders: Folders) -> list[str]:
    return sorted(p.name for p in folders.outbox.iterdir())


def test_a_dropped_job_produces_its_image_and_manifest_in_the_outbox(diffusers_folders: Folders):
    folders = diffusers_folders  # the real engine, end to end
    with folders.serve() as daemon:
        daemon.wait_ready()
        folders.drop("winter", tiny_job(seed=11))
        daemon.wait_for(lambda: (folders.outbox / "winter.json").exists(), what="the manifest")
        assert daemon.stop() == 0

    assert outputs(folders) == ["winter.json", "winter.png"]
    manifest = json.loads((folders.outbox / "winter.json").read_text())
    image = Image.open(folders.outbox / "winter.png")
    assert image.size == (manifest["output"]["width"], manifest["output"]["height"]) == (64, 64)
    assert json.loads(image.text["parameters"])["seed"] == 11 == manifest["seed"]
    assert [s["stage"] for s in manifest["stages"]] == ["prepare", "encode_text", "encode_latent", "sample", "decode"]
    assert manifest["engine"]["name"] == "diffusers" and "diffusers" in manifest["engine"]["version"]
    assert set(manifest["models"]) == {"vae", "text_encoder", "transformer"}
    assert {i["name"] for i in manifest["inputs"]} == {"job.json", "photo.png"}
    # The originals left the inbox and were archived; nothing remains in the inbox.
    assert list(folders.inbox.iterdir()) == []
    archived = next(folders.archive.iterdir())
    assert sorted(p.name for p in archived.iterdir()) == ["job.json", "photo.png"]
    assert folders.job_states() == {"winter": "done"}


def test_a_job_without_a_seed_gets_one_recorded_in_the_manifest(folders: Folders):
    job = tiny_job()
    del job["seed"]
    folders.drop("noseed", job, folder=False)
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((folders.outbox / "noseed.json").read_text())
    assert isinstance(manifest["seed"], int) and manifest["seed_source"] == "chosen at ingest"


def test_the_same_job_run_twice_gives_byte_identical_images(tmp_path, tiny_model):
    images = []
    for run in ("first", "second"):
        run_folders = Folders(tmp_path / run, tiny_model)
        run_folders.drop("same", tiny_job(seed=3, cfg=2.5, negative_prompt="blurry"))
        result = run_folders.run("serve", "--once")
        assert result.returncode == 0, result.stderr
        assert (run_folders.outbox / "same.png").exists(), result.stderr
        images.append((run_folders.outbox / "same.png").read_bytes())
    assert images[0] == images[1]


def test_a_job_killed_during_sample_resumes_and_gives_the_same_bytes(diffusers_folders: Folders, tmp_path,
                                                                     tiny_model):
    folders = diffusers_folders  # the real engine: its sampler's state is what resumes
    # Reference: the same job, uninterrupted, in folders of its own.
    reference = Folders(tmp_path / "reference", tiny_model)
    reference.drop("edit", tiny_job(seed=5, steps=6))
    assert reference.run("serve", "--once").returncode == 0
    expected = (reference.outbox / "edit.png").read_bytes()

    # The daemon dies by SIGKILL right after sampling step 4; the partial of step 3 is durable
    # by then (the pause lets the writer store it), step 4's may be.
    folders.drop("edit", tiny_job(seed=5, steps=6))
    with folders.serve(QIE_FAULTS="stage.sample.step3=pause:1,stage.sample.step4") as daemon:
        code = daemon.wait_exit()
    assert code == -9
    assert folders.job_states() == {"edit": "running"}
    assert not (folders.outbox / "edit.png").exists()

    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert (folders.outbox / "edit.png").read_bytes() == expected
    assert folders.db_rows("SELECT state, crashes FROM jobs") == [("done", 1)]
    runs = folders.stage_runs(1)
    first_life, second_life = runs[:3], runs[3:]
    assert [r[0] for r in first_life] == ["prepare", "encode_text", "encode_latent"]
    # After the restart only unfinished work is redone: sampling continues after step 3 (or 4)
    # from the checkpointed encodings, then decode.
    assert [(stage, hit, error) for stage, hit, _, error in second_life] == [("sample", 0, None), ("decode", 0, None)]
    assert second_life[0][2] in (3, 4)


def test_changing_only_the_seed_reuses_the_prepare_and_encode_checkpoints(folders: Folders):
    folders.drop("seed1", tiny_job(seed=1))
    assert folders.run("serve", "--once").returncode == 0
    folders.drop("seed2", tiny_job(seed=2))
    assert folders.run("serve", "--once").returncode == 0

    assert [(stage, hit) for stage, hit, _, _ in folders.stage_runs(2)] == [
        ("prepare", 1), ("encode_latent", 1), ("encode_text", 1), ("sample", 0), ("decode", 0)]
    assert (folders.outbox / "seed1.png").read_bytes() != (folders.outbox / "seed2.png").read_bytes()


def test_a_half_written_image_is_not_picked_up_until_it_is_complete(folders: Folders, tmp_path):
    complete = make_image(tmp_path / "source.png", (64, 64)).read_bytes()
    chunk = len(complete) // 4 + 1
    with folders.serve() as daemon:
        daemon.wait_ready()
        # The job file arrives first, then the image trickles in with pauses longer than the
        # settle time (0.3 s), as over a slow network share.
        job_dir = folders.inbox / "slow"
        job_dir.mkdir()
        (job_dir / "job.json").write_text(json.dumps(tiny_job()))
        with open(job_dir / "photo.png", "wb") as handle:
            for start in range(0, len(complete), chunk):
                handle.write(complete[start:start + chunk])
                handle.flush()
                if start + chunk < len(complete):
                    time.sleep(0.8)
                    assert folders.job_states() == {}, "a job was made from a half-written image"
        daemon.wait_for(lambda: (folders.outbox / "slow.png").exists(), what="the output")
        assert daemon.stop() == 0
    assert "not a complete image yet" in daemon.log or "still being written" in daemon.log
    archived = next(folders.archive.iterdir())
    assert (archived / "photo.png").read_bytes() == complete


def test_invalid_job_files_land_in_failed_naming_the_field_and_the_daemon_keeps_running(folders: Folders):
    with folders.serve() as daemon:
        daemon.wait_ready()
        folders.drop("typo", tiny_job(step=8))
        folders.drop("badcfg", tiny_job(cfg="lots"))
        (folders.inbox / "broken.json").write_text('{"prompt": "x", "image1": ')
        folders.drop("escape", tiny_job(image1="../../etc/passwd"), images={"photo.png": (64, 64)})
        folders.drop("good", tiny_job())
        daemon.wait_for(lambda: (folders.outbox / "good.png").exists(), what="the good job")
        daemon.wait_for(lambda: len(list(folders.failed.glob("*.error.json"))) == 4, what="four failures")
        assert daemon.alive()
        assert daemon.stop() == 0

    def report(name: str) -> dict:
        return json.loads((folders.failed / f"{name}.error.json").read_text())

    assert report("typo")["field"] == "step" and "unknown key" in report("typo")["error"]
    assert report("badcfg")["field"] == "cfg" and "typo" not in report("badcfg")["error"]
    assert "invalid JSON at line 1" in report("broken")["error"]
    assert report("escape")["field"] == "image1" and "'..'" in report("escape")["error"]
    # The originals are kept beside each report, so a person can fix and drop them again.
    assert sorted(p.name for p in (folders.failed / "typo").iterdir()) == ["job.json", "photo.png"]
    assert (folders.failed / "broken" / "broken.json").read_text() == '{"prompt": "x", "image1": '
    assert list(folders.inbox.iterdir()) == []


def test_a_crash_between_recording_and_clearing_the_inbox_makes_one_job(folders: Folders):
    folders.drop("once", tiny_job())
    with folders.serve("--once", QIE_FAULTS="ingest.recorded") as daemon:
        assert daemon.wait_exit() == -9
    assert (folders.inbox / "once" / "job.json").exists(), "files are removed only after the record is safe"
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert folders.db_rows("SELECT name, state FROM jobs") == [("once", "done")]
    assert outputs(folders) == ["once.json", "once.png"]


def test_status_and_show_report_jobs(folders: Folders):
    folders.drop("report", tiny_job())
    assert folders.run("serve", "--once").returncode == 0
    table = folders.run("status")
    assert table.returncode == 0 and "report" in table.stdout and "done" in table.stdout
    listed = json.loads(folders.run("status", "--json").stdout)["jobs"]
    assert [(j["name"], j["state"]) for j in listed] == [("report", "done")]
    shown = json.loads(folders.run("show", "1", "--json").stdout)
    assert [r["stage"] for r in shown["stage_runs"]] == ["prepare", "encode_text", "encode_latent", "sample", "decode"]


def test_a_second_daemon_on_the_same_folders_refuses_to_start(folders: Folders):
    with folders.serve() as first:
        first.wait_ready()
        second = folders.run("serve")
        assert second.returncode == 1
        assert "another qie-hotfolder daemon" in second.stderr
        assert first.stop() == 0


def test_a_job_naming_a_missing_lora_fails_at_once_as_permanent(folders: Folders):
    folders.drop("nolora", tiny_job(lora="missing-lora.safetensors"))
    result = folders.run("serve", "--once", QIE_FAKE__AVAILABLE_LORAS='["present.safetensors"]')
    assert result.returncode == 0, result.stderr
    assert folders.db_rows("SELECT state, error_kind, attempts FROM jobs") == [("failed", "permanent", 1)]
    report = json.loads((folders.failed / "nolora.error.json").read_text())
    assert report["kind"] == "permanent" and "missing-lora.safetensors" in report["error"]
    assert "gave up" not in report["error"]


def test_status_shows_a_killed_daemon_as_not_running(folders: Folders):
    with folders.serve() as daemon:
        daemon.wait_ready()
        daemon.wait_for(lambda: list((folders.work / "status").glob("*.json")), what="the status file")
        running = folders.run("status")
        assert "not running" not in running.stdout and "idle" in running.stdout
        daemon.kill()  # SIGKILL: the status file keeps its last words
    status = folders.run("status")
    assert status.returncode == 0, status.stderr
    assert "not running" in status.stdout and "models loaded" not in status.stdout
    assert json.loads(folders.run("status", "--json").stdout)["daemons"][0]["running"] == "stopped"


def test_a_seed_of_2_to_the_64_minus_1_is_accepted_and_recorded_exactly(folders: Folders):
    folders.drop("bigseed", tiny_job(seed=2**64 - 1))
    folders.drop("toobig", tiny_job(seed=2**64))
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert json.loads((folders.outbox / "bigseed.json").read_text())["seed"] == 2**64 - 1
    assert "seed" in json.loads((folders.failed / "toobig.error.json").read_text())["field"]


def test_a_daemon_of_another_machine_not_heard_from_is_shown_as_silent():
    from db import utcnow
    from processor.report import daemon_line, daemon_liveness

    last = {"worker": "another-host:4242", "pid": 4242, "doing": "job 3 (edit): sample step 2/4",
            "updated_at": "2026-01-01T10:00:00Z", "model_cache": {}}
    assert daemon_liveness(last) == "silent"
    line = daemon_line({**last, "running": "silent"})
    assert "not heard from" in line and "it was doing: job 3 (edit): sample step 2/4" in line
    assert daemon_liveness({**last, "updated_at": utcnow().isoformat() + "Z"}) == "running"
    assert daemon_liveness({**last, "doing": "stopped", "updated_at": utcnow().isoformat() + "Z"}) == "stopped"
