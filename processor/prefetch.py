"""Working ahead of the compute loop, so that the device is not idle between jobs.

While the compute loop runs a unit, this thread looks at what comes next (the scheduler's order
after the unit in hand) and

- prepares the next job's images (the ``prepare`` stage needs no model, only the CPU: loading a
  24 MP JPEG and scaling it takes a while), keeping the result in memory and having the writer
  store it, as the compute loop would; when that job's turn comes, its first unit on the device
  starts at once;
- loads the next unit's models, where they fit beside the loaded ones within the memory budget
  (nothing is evicted for a prefetch), so a cold start or a model swap costs no device time.

A prefetched result is an ordinary checkpoint (content-addressed), so computing it for a job
that another worker takes, or that is cancelled meanwhile, is harmless; the job's own run
record names this worker with "(prefetch)".
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from db import Job, utcnow
from processor.plan import Planner
from processor.runner import Unit
from processor.store import CheckpointStore, Run
from stages import BY_NAME, Engine, StageCall

log = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, planner: Planner, store: CheckpointStore, engine: Callable[[], Engine], worker: str,
                 max_image_pixels: int, recorded: Callable[[], set[str]], prepare: bool = True):
        self.planner = planner
        self.store = store
        self._engine = engine
        self.worker = worker
        self.max_image_pixels = max_image_pixels
        self._recorded = recorded  # fingerprints known to have a checkpoint
        self.prepare = prepare  # prepare the next jobs' images too (not when others may take them)
        self._wanted: Optional[list[Unit]] = None
        self._busy_with: Optional[str] = None  # the fingerprint being prepared
        self._lock = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.prepared = 0
        self.loaded = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qie-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def consider(self, current: Unit, upcoming: list[Unit], load_models: bool) -> None:
        """The compute loop starts ``current``; ``upcoming`` is what the scheduler would run after.
        ``load_models``: every model the queued work needs fits the budget together (else loading
        ahead would only evict a model that is needed first, and the scheduler's windows decide)."""
        computing = self._fingerprint(current)
        wanted = []
        for unit in upcoming:
            if unit.error is not None or unit.job.id == current.job.id and unit.stage == current.stage:
                continue
            if unit.stage == "prepare" and self.prepare and self._fingerprint(unit) != computing:
                wanted.append(unit)
            elif load_models and unit.models:
                wanted.append(unit)
            if len(wanted) == 2:
                break
        with self._lock:
            self._wanted = wanted or None
            self._lock.notify_all()

    def _fingerprint(self, unit: Unit) -> Optional[str]:
        try:
            return self.planner.plan(unit.job).chain.get(unit.stage)
        except Exception:  # noqa: BLE001 - a job that cannot be planned is failed by the compute loop
            return None

    def wait_for(self, fingerprint: str, timeout: float = 600.0) -> None:
        """Wait while ``fingerprint`` is being prefetched (the compute loop then finds it in memory)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy_with == fingerprint and time.monotonic() < deadline:
                self._lock.wait(0.5)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self._wanted is None:
                    self._lock.wait()
                if self._stop:
                    return
                wanted, self._wanted = self._wanted, None
            for unit in wanted:
                try:
                    self._ahead(unit)
                except Exception as exc:  # noqa: BLE001 - working ahead is an optimisation only
                    log.debug("prefetch for job %d (%s) failed: %s", unit.job.id, unit.stage, exc)

    def _ahead(self, unit: Unit) -> None:
        plan = self.planner.plan(unit.job)
        if unit.stage == "prepare":
            self._prepare(unit.job, plan)
        elif unit.models:
            engine = self._engine()
            with engine.cache.prefetching(estimates=engine.model_bytes(plan.params)):
                engine.load_models(unit.stage, plan.params)
            self.loaded += 1

    def _prepare(self, job: Job, plan) -> None:
        stage = BY_NAME["prepare"]
        fingerprint = plan.chain[stage.name]
        if fingerprint in self._recorded() or self.store.memo.get(fingerprint) is not None:
            return
        with self._lock:
            self._busy_with = fingerprint
        try:
            started_at, started = utcnow(), time.perf_counter()
            payload = stage.compute(StageCall(engine=self._engine(), inputs={}, job=plan.job, params=plan.params,
                                              image_paths=plan.image_paths, max_image_pixels=self.max_image_pixels))
            run = Run(job.id, stage.name, fingerprint, self._engine().device_name(), f"{self.worker} (prefetch)",
                      started_at, time.perf_counter() - started)
            self.store.save(stage.name, fingerprint, payload, run, forget_partials=False)
            self.prepared += 1
            log.debug("job %d: prepared ahead in %.3fs", job.id, run.seconds)
        finally:
            with self._lock:
                self._busy_with = None
                self._lock.notify_all()
