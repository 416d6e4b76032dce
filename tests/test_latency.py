"""Results as soon as they are ready: the default scheduling runs jobs in order when the models fit,
batches model loads in windows when they do not, works ahead, and says when each job will be done."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from batch import drop_jobs, settings_for  # noqa: E402

from db import StageRun  # noqa: E402
from processor.daemon import Daemon  # noqa: E402
from tests.daemon import Folders, tiny_job  # noqa: E402

TIGHT = 8_000_000 + 1_000_000 + 1024  # the fake diffusion model and VAE, not the text encoder besides


def run_batch(root: Path, count: int, **overrides) -> tuple[Daemon, list[tuple[int, str, int]]]:
    """``count`` jobs through an in-process daemon; the units in the order they ran."""
    settings = settings_for(root, None, **overrides)
    drop_jobs(settings.inbox, count)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        while daemon.tick(time.monotonic()):
            pass
        with daemon.db.begin() as session:
            runs = [(r.job_id, r.stage, r.id) for r in session.scalars(
                select(StageRun).where(StageRun.cache_hit.is_(False)).order_by(StageRun.started_at, StageRun.id))]
    finally:
        daemon.shutdown()
    return daemon, runs


def finished_order(runs: list[tuple[int, str, int]]) -> list[int]:
    return [job for job, stage, _ in runs if stage == "decode"]


def test_with_room_for_every_model_jobs_run_in_order_one_after_another(tmp_path):
    daemon, runs = run_batch(tmp_path, 4, prefetch=False)
    assert daemon.scheduler.policy([]) == "job-by-job"
    assert finished_order(runs) == [1, 2, 3, 4]
    # Each job is finished before the next one starts: its units are consecutive.
    jobs_in_order = [job for job, _, _ in runs]
    assert jobs_in_order == sorted(jobs_in_order)


def test_without_room_models_load_once_per_window_and_results_still_come_one_by_one(tmp_path):
    daemon, runs = run_batch(tmp_path, 6, model_memory_budget=TIGHT, batch_window=3, prefetch=False)
    loads = daemon.cache.stats.loads
    assert loads["text_encoder"] == 2 and loads["transformer"] == 2, dict(loads)  # once per window of 3
    order = finished_order(runs)
    assert sorted(order[:3]) == [1, 2, 3] and sorted(order[3:]) == [4, 5, 6]  # no job waits behind more than a window
    # Within a window each job is decoded as soon as it is sampled.
    stages = [(job, stage) for job, stage, _ in runs if stage in ("sample", "decode")]
    assert all(stages[i][1] == "sample" and stages[i + 1] == (stages[i][0], "decode") for i in range(0, len(stages), 2))


def test_a_more_urgent_job_joins_the_running_window(tmp_path):
    settings = settings_for(tmp_path, None, model_memory_budget=TIGHT, batch_window=2, prefetch=False)
    drop_jobs(settings.inbox, 4)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        daemon.tick(time.monotonic())  # the first window (jobs 1 and 2) starts
        drop_jobs(settings.inbox, 1, offset=100, priority=10)
        daemon.intake.wake.set()
        while daemon.tick(time.monotonic()):
            pass
        with daemon.db.begin() as session:
            decoded = [r.job_id for r in session.scalars(select(StageRun).where(StageRun.stage == "decode")
                                                         .order_by(StageRun.started_at))]
    finally:
        daemon.shutdown()
    assert decoded.index(5) < decoded.index(3), f"the urgent job waited for the next window: {decoded}"


def test_the_next_jobs_images_are_prepared_while_a_job_computes(folders: Folders):
    for index in range(3):  # images of their own: nothing to reuse between the jobs
        folders.drop(f"job{index}", tiny_job(seed=index), images={"photo.png": (64 + 16 * index, 64)})
    result = folders.run("serve", "--once", QIE_FAKE__UNIT_SECONDS="0.3")
    assert result.returncode == 0, result.stderr
    workers = folders.db_rows("SELECT job_id, worker FROM stage_runs WHERE stage = 'prepare' ORDER BY job_id")
    assert [job for job, worker in workers if worker.endswith("(prefetch)")] == [2, 3]
    assert len(list(folders.outbox.glob("*.png"))) == 3


def test_status_and_the_manifest_say_when_a_job_starts_and_finishes(folders: Folders):
    # A first job measures the stages; then a job runs while two wait.
    folders.drop("first", tiny_job(seed=1))
    assert folders.run("serve", "--once", QIE_FAKE__UNIT_SECONDS="0.2").returncode == 0
    with folders.serve(QIE_FAKE__UNIT_SECONDS="2") as daemon:
        daemon.wait_ready()
        for name in ("a", "b", "c"):
            folders.drop(name, tiny_job(seed=ord(name)))
        daemon.wait_for(lambda: folders.job_states().get("c") == "queued" and folders.job_states().get("a") == "running",
                        what="a running, b and c queued")
        status = {job["name"]: job for job in json.loads(folders.run("status", "--json").stdout)["jobs"]}
        table = folders.run("status").stdout
        daemon.kill()
    assert status["b"]["estimated_start"] <= status["c"]["estimated_start"]
    assert status["b"]["estimated_finish"] <= status["c"]["estimated_start"]
    assert status["a"]["estimated_finish"] and status["first"]["estimated_finish"] is None
    assert "ETA" in table
    manifest = json.loads((folders.outbox / "first.json").read_text())
    assert set(manifest["timing"]) >= {"queued_at", "started_at", "published_at", "estimated_finish_when_queued"}
    assert folders.db_rows("SELECT estimated_finish IS NOT NULL FROM jobs WHERE name = 'c'") == [(1,)]
