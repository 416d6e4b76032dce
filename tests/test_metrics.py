"""``/metrics``: Prometheus text that prometheus-client's own parser reads, whose counters move
as jobs run."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from db import Database
from tests.daemon import Folders, tiny_job
from tests.test_web_api import LOOPBACK, settings_of
from web import create_app


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("qie_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_parse_and_their_counters_move_as_jobs_run(folders: Folders):
    Database(f"sqlite:///{folders.state}").close()
    app = create_app(settings_of(folders), token=None)
    with TestClient(app, base_url=LOOPBACK) as client:
        before = scrape(client)
        assert before[("qie_jobs", (("state", "done"),))] == 0
        assert before[("qie_job_wait_seconds_count", ())] == 0

        folders.drop("one", tiny_job(seed=1))
        folders.drop("two", tiny_job(seed=2))
        folders.drop("seed-sweep", tiny_job(seed=1, steps=2, seeds=None))
        assert folders.run("serve", "--once").returncode == 0

        after = scrape(client)
    app.state.ctx.db.close()
    assert after[("qie_jobs", (("state", "done"),))] == 3
    assert after[("qie_queue_depth", ())] == 0
    assert after[("qie_job_wait_seconds_count", ())] == 3
    assert after[("qie_stage_runs_total", (("stage", "sample"),))] == 3
    assert after[("qie_stage_duration_seconds_count", (("stage", "sample"),))] == 3
    assert after[("qie_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", "decode")))] == 3
    # "one" and "seed-sweep" share image, prompt and seed up to sampling: encodings were reused.
    assert after[("qie_checkpoint_reuse_total", (("stage", "encode_text"),))] >= 1
    loads = {labels: value for (name, labels), value in after.items() if name == "qie_model_loads_total"}
    assert sum(loads.values()) >= 3  # the daemon's own counts, from its status file
    worker = dict(next(iter(loads)))["worker"]
    assert after[("qie_model_load_seconds_total", (("worker", worker),))] >= 0
    assert after[("qie_daemon_up", (("worker", worker),))] == 0  # it stopped
    assert after[("qie_notifications", (("state", "delivered"),))] + after[("qie_notifications", (("state", "pending"),))] == 3
