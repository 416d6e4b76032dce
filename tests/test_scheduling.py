"""Scheduling: stage-major runs each stage for the whole batch while its models are loaded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from batch import drop_jobs, run_batch, settings_for  # noqa: E402

from processor.daemon import Daemon  # noqa: E402
from tests.daemon import Folders, make_image, tiny_job  # noqa: E402


# The fake engine's models: 1 MB VAE, 4 MB text encoder, 8 MB diffusion model (its defaults).
TIGHT = 8_000_000 + 1_000_000 + 1024  # room for the diffusion model and the VAE, not the text encoder too


def test_stage_major_loads_each_model_once_for_a_batch_that_does_not_fit_in_memory(tmp_path):
    result = run_batch(tmp_path, None, 4, scheduling="stage-major", model_memory_budget=TIGHT)
    assert result.published == 4
    assert result.loads == {"text_encoder": 1, "vae": 1, "transformer": 1}
    assert result.unloads == {"text_encoder": 1}


def test_job_by_job_reloads_models_for_every_job_under_the_same_budget(tmp_path):
    result = run_batch(tmp_path, None, 4, scheduling="job-by-job", model_memory_budget=TIGHT)
    assert result.published == 4
    assert result.loads["text_encoder"] == 4 and result.loads["transformer"] == 4


def test_both_policies_give_the_same_images(tmp_path):
    for policy in ("stage-major", "job-by-job", "auto"):
        run_batch(tmp_path / policy, None, 3, scheduling=policy, model_memory_budget=TIGHT)
    for name in ("job-0000.png", "job-0001.png", "job-0002.png"):
        expected = (tmp_path / "job-by-job" / "outbox" / name).read_bytes()
        assert (tmp_path / "stage-major" / "outbox" / name).read_bytes() == expected
        assert (tmp_path / "auto" / "outbox" / name).read_bytes() == expected


def test_a_higher_priority_job_is_finished_first(tmp_path):
    settings = settings_for(tmp_path, None)
    drop_jobs(settings.inbox, 3)
    urgent = settings.inbox / "urgent"
    (tmp_path / "staging").mkdir()
    make_image(tmp_path / "staging" / "photo.png")
    (tmp_path / "staging" / "job.json").write_text(json.dumps(tiny_job(priority=10)))
    (tmp_path / "staging").rename(urgent)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        while daemon.tick(time.monotonic()):
            pass
    finally:
        daemon.shutdown()
    finished = sorted(settings.outbox.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    assert finished[0].name == "urgent.png"


def test_a_seed_sweep_encodes_once_and_gives_one_output_per_seed(folders: Folders):
    sweep = tiny_job(seeds=[3, 4, 5])
    del sweep["seed"]
    folders.drop("sweep", sweep)
    result = folders.run("serve", "--once")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folders.outbox.glob("*.png")) == ["sweep-3.png", "sweep-4.png", "sweep-5.png"]
    computed = folders.db_rows("SELECT stage, COUNT(*) FROM stage_runs WHERE cache_hit = 0 GROUP BY stage")
    assert dict(computed) == {"prepare": 1, "encode_latent": 1, "encode_text": 1, "sample": 3, "decode": 3}
    # The shared originals are archived once, after the last of the three jobs.
    assert len(list(folders.archive.iterdir())) == 1
    manifest = json.loads((folders.outbox / "sweep-4.json").read_text())
    assert manifest["seed"] == 4


def test_variations_give_consecutive_seeds(folders: Folders):
    folders.drop("vary", tiny_job(seed=10, variations=2))
    assert folders.run("serve", "--once").returncode == 0
    assert sorted(p.name for p in folders.outbox.glob("*.png")) == ["vary-10.png", "vary-11.png"]
