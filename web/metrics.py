"""``/metrics``: Prometheus text, computed at scrape time from the database and status files.

Reading the shared database and work folder (not counters inside one process) makes the same
figures come from a daemon's own server, from ``run.py web`` on another machine, and from any
of several workers. Counters are counts of rows that only grow (events, stage runs); a few
figures exist only inside a daemon (model loads, GPU memory) and come from its status file,
labelled by worker: they restart from zero with it, as Prometheus counters may.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from db import jobs as jobs_, notifications, utcnow, views
from processor.health import daemon_health
from web.context import WebContext
from web.present import STATES

router = APIRouter()
EVENT_KINDS = ("failed", "retry", "recovered")

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 86400)


SETTLE = timedelta(seconds=60)  # rows older than this are taken as final (no transaction commits so late)


@dataclass
class Histogram:
    """Cumulative counts per upper bound, with the count and the sum of what was observed."""

    bounds: tuple
    buckets: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.buckets = self.buckets or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for index in range(bisect.bisect_left(self.bounds, value), len(self.bounds)):
            self.buckets[index] += 1
        self.count += 1
        self.total += value

    def copy(self) -> "Histogram":
        return Histogram(self.bounds, list(self.buckets), self.count, self.total)


class Tallies:
    """The histograms and counts of rows that only grow (stage runs, events, jobs' start times),
    kept between scrapes: rows settled for a minute are added once, the newer ones are read
    again at each scrape. So a scrape reads what the last minute added, not the whole history."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run_id = 0
        self.event_id = 0
        self.started_until: Optional[datetime] = None
        self.stages: dict[str, Histogram] = {}
        self.runs: Counter = Counter()
        self.events: Counter = Counter()
        self.wait = Histogram(WAIT_BUCKETS)

    def read(self, session: Any, now: datetime) -> tuple[dict[str, Histogram], Counter, Counter, Histogram]:
        """The tallies as of now: the settled ones kept, the newer rows added to a copy."""
        with self.lock:
            settled = now - SETTLE
            stages = {stage: h.copy() for stage, h in self.stages.items()}
            runs, events, wait = Counter(self.runs), Counter(self.events), self.wait.copy()
            keep = True  # the rows read so far are all settled: the next settled one joins the kept tallies
            for row in views.stage_runs_after(session, self.run_id):
                keep = keep and row.finished_at is not None and row.finished_at < settled
                for kept_stages, kept_runs in ((stages, runs), (self.stages, self.runs))[:2 if keep else 1]:
                    kept_runs[(row.stage, bool(row.cache_hit))] += 1
                    if not row.cache_hit and row.duration_s is not None:
                        kept_stages.setdefault(row.stage, Histogram(STAGE_BUCKETS)).observe(row.duration_s)
                if keep:
                    self.run_id = row.id
            keep = True
            for row in views.job_events_after(session, self.event_id, EVENT_KINDS):
                keep = keep and row.at < settled
                events[row.kind] += 1
                if keep:
                    self.events[row.kind] += 1
                    self.event_id = row.id
            for created, started in views.jobs_started_after(session, self.started_until):
                seconds = max((started - created).total_seconds(), 0.0)
                wait.observe(seconds)
                if started <= settled:
                    self.wait.observe(seconds)
            self.started_until = settled
            return stages, runs, events, wait


def histogram_family(name: str, doc: str, labels: list[str], found: dict[Any, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, histogram in sorted(found.items(), key=lambda item: str(item[0])):
        buckets = [(str(float(b)), n) for b, n in zip(histogram.bounds, histogram.buckets)] + [("+Inf", histogram.count)]
        family.add_metric([key] if labels else [], buckets, histogram.total)
    return family


class QueueCollector(Collector):
    def __init__(self, ctx: WebContext):
        self.ctx = ctx
        self.tallies = Tallies()

    def collect(self) -> Iterator[Any]:
        now = utcnow()
        with self.ctx.db.begin() as session:
            by_state = {state: 0 for state in STATES}
            by_state.update(jobs_.counts_by_state(session))
            oldest = views.oldest_queued_at(session)
            stages, runs, events, wait = self.tallies.read(session, now)
            failed = views.failed_by_kind(session)
            notes = notifications.counts(session)

        jobs = GaugeMetricFamily("qie_jobs", "Jobs by state.", labels=["state"])
        for state, count in by_state.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("qie_queue_depth", "Jobs queued (waiting for a worker or a retry time).",
                                value=by_state.get("queued", 0))
        yield GaugeMetricFamily("qie_oldest_queued_job_age_seconds", "Age of the oldest queued job (0: none).",
                                value=(now - oldest).total_seconds() if oldest else 0.0)
        yield histogram_family("qie_job_wait_seconds", "Seconds from being queued to starting, per job that started.",
                               [], {None: wait})
        yield histogram_family("qie_stage_duration_seconds", "Seconds per computed stage run (reuses left out).",
                               ["stage"], stages)
        computed = CounterMetricFamily("qie_stage_runs", "Stage runs computed.", labels=["stage"])
        reused = CounterMetricFamily("qie_checkpoint_reuse", "Stage results reused from a checkpoint.", labels=["stage"])
        for (stage, hit), count in sorted(runs.items()):
            (reused if hit else computed).add_metric([stage], count)
        yield computed
        yield reused
        yield CounterMetricFamily("qie_job_failures", "Jobs that failed (each failure of a job retried later counts).",
                                  value=events["failed"])
        kinds = GaugeMetricFamily("qie_failed_jobs", "Jobs failed now, by kind (permanent, transient, crash).",
                                  labels=["kind"])
        for kind in ("permanent", "transient", "crash"):
            kinds.add_metric([kind], failed.pop(kind, 0))
        for kind, count in failed.items():
            kinds.add_metric([kind], count)
        yield kinds
        yield CounterMetricFamily("qie_job_retries", "Transient errors retried after a backoff.", value=events["retry"])
        yield CounterMetricFamily("qie_job_resumes", "Jobs resumed from their checkpoints after their worker died "
                                  "or lost its lease.", value=events["recovered"])
        pending = GaugeMetricFamily("qie_notifications", "Notifications in the outbox, by state.", labels=["state"])
        for state in ("pending", "delivered", "gave_up"):
            pending.add_metric([state], notes.get(state, 0))
        yield pending
        yield from self._daemons(now)

    def _daemons(self, now: Any) -> Iterator[Any]:
        up = GaugeMetricFamily("qie_daemon_up", "1 when the daemon's status is fresh and its loop ticks.", labels=["worker"])
        loads = CounterMetricFamily("qie_model_loads", "Model loads since the daemon started.", labels=["worker", "role"])
        unloads = CounterMetricFamily("qie_model_unloads", "Model evictions since the daemon started.",
                                      labels=["worker", "role"])
        load_seconds = CounterMetricFamily("qie_model_load_seconds", "Seconds spent loading models since the daemon "
                                           "started.", labels=["worker"])
        loaded = GaugeMetricFamily("qie_model_loaded_bytes", "Bytes of each loaded model.", labels=["worker", "role"])
        budget = GaugeMetricFamily("qie_model_memory_budget_bytes", "The model cache's memory budget.", labels=["worker"])
        gpu = GaugeMetricFamily("qie_gpu_memory_bytes", "CUDA memory of the daemon's process.", labels=["worker", "kind"])
        for status in self.ctx.daemons():
            worker = str(status.get("worker", "?"))
            up.add_metric([worker], 1.0 if daemon_health(status, now)[0] else 0.0)
            cache = status.get("model_cache") or {}
            for role, count in (cache.get("loads") or {}).items():
                loads.add_metric([worker, role], count)
            for role, count in (cache.get("unloads") or {}).items():
                unloads.add_metric([worker, role], count)
            load_seconds.add_metric([worker], float(cache.get("load_seconds") or 0.0))
            for role, size in (status.get("models_loaded") or {}).items():
                loaded.add_metric([worker, role], size)
            if status.get("budget_bytes"):
                budget.add_metric([worker], status["budget_bytes"])
            for kind, value in (status.get("gpu_memory") or {}).items():
                gpu.add_metric([worker, kind], value)
        yield from (up, loads, unloads, load_seconds, loaded, budget, gpu)


def registry_for(ctx: WebContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(ctx))
    return registry


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
