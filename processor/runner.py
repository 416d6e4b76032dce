"""Running one unit of work: a stage of a job, computed from the results it reads; publishing
after the final stage.

``run`` obtains the stage's inputs (from memory, or from their verified checkpoints, or by
computing them again when a checkpoint went bad), computes the stage on the engine, and hands
the result to the checkpoint store, which keeps it in memory for the next stage and has the
writer store and record it. A stepped stage (``sample``) reports its progress after every step,
writes a partial every ``partial_interval`` seconds and, when it is stopped (shutdown, cancel,
lost lease), a partial of its last finished step, so that it resumes there with identical bytes.

Everything that ends a unit's job (publishing, failing, cancelling, giving it back to the
queue) is a writer task too, queued behind the job's checkpoint records, so it happens in the
order the job's work was done, beside the next unit's computation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

from config import Settings
from db import Database, Job, jobs, utcnow
from processor import publish
from processor.faults import fault_point
from processor.lease import Heartbeat
from processor.logs import job_context
from processor.plan import FINAL, PUBLISH, JobPlan, Planner
from processor.store import CheckpointStore, Run
from processor.writer import Writer
from stages import BY_NAME, Engine, PermanentError, RetryableError, Stage, StageCall, StageInterrupted, classify

log = logging.getLogger(__name__)


class Outcome(str, Enum):
    COMPUTED = "computed"  # the stage is done; the job is still held for its next unit
    PUBLISHING = "publishing"  # the final result is being published by the writer
    STOPPED = "stopped"  # given back to the queue (or cancelled) at a step boundary
    FAILED = "failed"  # failed, or queued for a retry
    LOST = "lost"  # another worker took the job over


@dataclass
class Unit:
    """One unit of work: ``stage`` of ``job`` (or publishing it); ``error`` when it cannot be planned."""

    job: Job
    stage: str
    models: tuple[str, ...] = ()
    error: Optional[Exception] = None


class JobRunner:
    def __init__(self, settings: Settings, db: Database, engine: Callable[[], Engine], planner: Planner,
                 store: CheckpointStore, writer: Writer, heartbeat: Heartbeat, worker: str,
                 stop: threading.Event, progress: Optional[Callable[[str], None]] = None):
        self.settings = settings
        self.db = db
        self._engine = engine
        self.planner = planner
        self.store = store
        self.writer = writer
        self.heartbeat = heartbeat
        self.worker = worker
        self.stop = stop
        self.progress = progress or (lambda _text: None)
        self._used: set[tuple[int, str]] = set()  # (job, stage) whose result the job has computed or noted
        self.before_compute: Callable[[str], None] = lambda fingerprint: None  # waits for work done ahead
        self.model_loads: dict[int, Counter] = {}

    @property
    def engine(self) -> Engine:
        return self._engine()

    # Running a unit --------------------------------------------------------------------------------

    def run(self, unit: Unit) -> Outcome:
        """Run a unit of a job this worker holds."""
        job = unit.job
        loads_before = self._cache_loads()
        try:
            failure = self.writer.failure(job.id)
            if failure is not None:
                raise failure
            if unit.error is not None:
                raise unit.error
            plan = self.planner.plan(job)
            if unit.stage == PUBLISH:
                image = self._obtain(BY_NAME[FINAL], job, plan)
                return self._publish(job, plan, image)
            stage = BY_NAME[unit.stage]
            self.before_compute(plan.chain[stage.name])
            ahead = self.store.memo.get(plan.chain[stage.name])  # computed ahead (prefetch) meanwhile
            if ahead is not None:
                payload = self._obtain(stage, job, plan)
            else:
                inputs = {read: self._obtain(BY_NAME[read], job, plan) for read in stage.reads}
                payload = self._compute(stage, job, plan, inputs)
            if stage.final:
                return self._publish(job, plan, payload)
            return Outcome.COMPUTED
        except StageInterrupted:
            return self._stopped(job)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            return self._failed(job, exc)
        finally:
            self.model_loads.setdefault(job.id, Counter()).update(self._cache_loads() - loads_before)

    def release(self, job: Job, reason: Optional[str] = None) -> None:
        """Give a held job back to the queue, once its pending writes are recorded."""

        def give_back() -> None:
            with self.db.begin() as session:
                if reason is None:
                    jobs.release_between_stages(session, job.id, self.worker)
                else:
                    jobs.release(session, job.id, self.worker, reason)
            self.heartbeat.drop(job.id)

        self.writer.submit(job.id, f"job {job.id}: back to the queue", give_back)

    def done_fingerprints(self, job_id: int, plan: JobPlan) -> set[str]:
        """Fingerprints of the stages this job computed or obtained in this process."""
        return {plan.chain[stage] for used_job, stage in self._used if used_job == job_id and stage in plan.chain}

    def forget(self, job_id: int) -> None:
        self.planner.forget(job_id)
        self._used = {used for used in self._used if used[0] != job_id}
        self.model_loads.pop(job_id, None)

    def _obtain(self, stage: Stage, job: Job, plan: JobPlan) -> Any:
        """A stage's result for this job: from memory, its verified checkpoint, or computed again."""
        fingerprint = plan.chain[stage.name]
        found = self.store.load(stage.name, fingerprint)
        if found is not None:
            if (job.id, stage.name) not in self._used:
                self._used.add((job.id, stage.name))
                self.store.note_reuse(job.id, stage.name, fingerprint, self.engine.device_name(), self.worker)
            return found.payload
        with job_context(job.id, stage.name):
            inputs = {read: self._obtain(BY_NAME[read], job, plan) for read in stage.reads}
            return self._compute(stage, job, plan, inputs)

    def _compute(self, stage: Stage, job: Job, plan: JobPlan, inputs: dict[str, Any]) -> Any:
        """Compute ``stage`` and hand its result to the store."""
        name = stage.name
        fingerprint = plan.chain[name]
        steps_total = stage.steps_for(plan.params)
        resume, partials_found = self.store.resume_point(fingerprint) if stage.stepped else (None, False)
        resumed_from = resume.step if resume else None
        self.heartbeat.progress(job.id, name, resumed_from, steps_total)
        self.progress(progress_text(job, name, resumed_from, steps_total))
        fault_point(f"stage.{name}")
        fault_point(f"job.{job.name}.stage.{name}")
        started_at, started = utcnow(), time.perf_counter()
        loading_before = self.engine.cache.thread_load_seconds()
        recorder = StepRecorder(self, job, stage, fingerprint, steps_total, resumed_from) if stage.stepped else None
        call = StageCall(engine=self.engine, inputs=inputs, job=plan.job, params=plan.params,
                         image_paths=plan.image_paths, max_image_pixels=self.settings.max_image_pixels,
                         resume=resume, on_step=recorder, should_stop=lambda: self.should_stop(job))
        def run_record() -> Run:
            return Run(job.id, name, fingerprint, self.engine.device_name(), self.worker, started_at,
                       time.perf_counter() - started, resumed_from,
                       self.engine.cache.thread_load_seconds() - loading_before)

        try:
            payload = stage.compute(call)
        except StageInterrupted:
            if recorder is not None:
                recorder.keep_last()
            self.store.record_run_error(run_record(), "interrupted")
            raise
        except Exception as exc:
            self.store.record_run_error(run_record(), str(exc) or type(exc).__name__)
            raise
        run = run_record()
        seconds = run.seconds
        self.store.save(name, fingerprint, payload, run,
                        forget_partials=partials_found or (recorder is not None and recorder.wrote_partials))
        self._used.add((job.id, name))
        log.info("job %d: %s computed in %.3fs", job.id, name, seconds)
        return payload

    def should_stop(self, job: Job) -> bool:
        """A shutdown was asked for, the job was cancelled, or another worker took it over."""
        return self.stop.is_set() or self.heartbeat.lost(job.id) or self.heartbeat.cancel_requested(job.id)

    # Ending a job ----------------------------------------------------------------------------------

    def _publish(self, job: Job, plan: JobPlan, final: Any) -> Outcome:
        loads = self.model_loads.get(job.id, Counter())
        engine = self.engine

        def run() -> None:
            try:
                publish.publish_job(self.settings, self.db, self.worker, job, plan, final, engine, dict(loads))
            except publish.LeaseLost:
                log.warning("job %d: lease lost before publishing; leaving it to the worker that has it", job.id)
            except Exception as exc:  # noqa: BLE001 - a publish error is the job's failure, with its cause
                self._fail(job, exc, "publish")
            finally:
                self.heartbeat.drop(job.id)
                self.forget(job.id)

        self.writer.submit(job.id, f"job {job.id}: publish", run, PUBLISH)
        return Outcome.PUBLISHING

    def _stopped(self, job: Job) -> Outcome:
        if self.heartbeat.lost(job.id):
            self.heartbeat.drop(job.id)
            self.forget(job.id)
            return Outcome.LOST
        cancel = self.heartbeat.cancel_requested(job.id) and not self.stop.is_set()

        def end() -> None:
            with self.db.begin() as session:
                if cancel or jobs.cancel_requested(session, job.id):
                    jobs.mark_cancelled(session, job.id, self.worker)
                    log.info("job %d cancelled at a step boundary", job.id)
                else:
                    jobs.release(session, job.id, self.worker, "stopped at a step boundary; will resume")
                    log.info("job %d released at a checkpoint", job.id)
            self.heartbeat.drop(job.id)

        self.writer.submit(job.id, f"job {job.id}: stopped", end)
        self.forget(job.id)
        return Outcome.STOPPED

    def _failed(self, job: Job, exc: Exception) -> Outcome:
        if self.heartbeat.lost(job.id):
            self.heartbeat.drop(job.id)
            self.forget(job.id)
            return Outcome.LOST
        stage = self.heartbeat.stage_of(job.id)

        def end() -> None:
            try:
                self._fail(job, exc, stage)
            finally:
                self.heartbeat.drop(job.id)

        self.writer.submit(job.id, f"job {job.id}: failed", end)
        self.forget(job.id)
        return Outcome.FAILED

    def _fail(self, job: Job, exc: BaseException, stage: Optional[str]) -> None:
        """Record a failed unit: a retry later for a transient error with attempts left, else the
        job fails with a report in failed/ (in the writer thread)."""
        kind = classify(exc)
        message = self.settings.relative_to_folders(str(exc) or type(exc).__name__)
        with self.db.begin() as session:
            if not jobs.holds(session, job.id, self.worker):
                log.warning("job %d: no longer ours; its failure (%s) is not recorded", job.id, message)
                return
            current = jobs.get_job(session, job.id)
            attempts = (current.attempts if current else job.attempts) + 1
        if issubclass(kind, RetryableError) and attempts < self.settings.max_attempts:
            delay = self.settings.retry_backoff * (2 ** (attempts - 1))
            at = utcnow() + timedelta(seconds=delay)
            log.warning("job %d: transient error (attempt %d of %d): %s; retry in %.0fs",
                        job.id, attempts, self.settings.max_attempts, message, delay)
            with self.db.begin() as session:
                jobs.schedule_retry(session, job.id, self.worker, message, at)
            return
        permanent = issubclass(kind, PermanentError)
        if permanent:
            log.error("job %d failed: %s", job.id, message, exc_info=not isinstance(exc, PermanentError))
        else:
            message = f"{message} (gave up after {attempts} attempts)"
            log.error("job %d failed: %s", job.id, message)
        report = publish.FailureReport(job_id=job.id, job=job.name, source=job.source, error=message,
                                       kind="permanent" if permanent else "transient", stage=stage,
                                       attempts=attempts, exception=type(exc).__name__)
        try:
            publish.report_failed(self.settings, job.name, Path(job.work_dir) / "originals", report)
        except Exception as report_error:  # noqa: BLE001 - the job fails with its own cause all the same
            log.error("job %d: its report could not be written to failed/ (%s)", job.id, report_error)
            message += f" (its report could not be written to failed/: {report_error})"
        with self.db.begin() as session:
            jobs.mark_failed(session, job.id, self.worker, message, report.kind)

    def _cache_loads(self) -> Counter:
        try:
            return Counter(self.engine.cache.stats.loads)
        except Exception:  # noqa: BLE001 - an engine that cannot start fails the job elsewhere
            return Counter()


class StepRecorder:
    """``on_step`` of a stepped stage: progress after every step (stored by the heartbeat), a
    partial when ``partial_interval`` seconds passed since the last one, and ``keep_last`` to
    store the last finished step when the stage is stopped."""

    def __init__(self, runner: JobRunner, job: Job, stage: Stage, fingerprint: str, steps_total: Optional[int],
                 resumed_from: Optional[int]):
        self.runner = runner
        self.job = job
        self.stage = stage
        self.fingerprint = fingerprint
        self.steps_total = steps_total
        self.wrote_partials = False
        self._last_partial = time.monotonic()
        self._saved_step = resumed_from or 0
        self._last: Optional[tuple[int, Any]] = None

    def __call__(self, step: int, state: Any) -> None:
        settings = self.runner.settings
        self._last = (step, state)
        now = time.monotonic()
        if (settings.save_partials and self.steps_total and step < self.steps_total
                and now - self._last_partial >= settings.partial_interval):
            self._save(step, state)
            self._last_partial = now
        self.runner.heartbeat.progress(self.job.id, self.stage.name, step, self.steps_total)
        self.runner.progress(progress_text(self.job, self.stage.name, step, self.steps_total))
        fault_point(f"stage.{self.stage.name}.step{step}")
        fault_point(f"job.{self.job.name}.stage.{self.stage.name}.step{step}")

    def keep_last(self) -> None:
        """The stage was stopped: store its last finished step, unless stored already."""
        if self._last is not None and self._last[0] > self._saved_step and self.runner.settings.save_partials:
            self._save(*self._last)

    def _save(self, step: int, state: Any) -> None:
        self.runner.store.save_partial(self.job.id, self.stage.name, self.fingerprint, step, state)
        self._saved_step = step
        self.wrote_partials = True


def progress_text(job: Job, stage: str, step: Optional[int], steps_total: Optional[int]) -> str:
    return f"job {job.id} ({job.name}): {stage}" + (f" step {step or 0}/{steps_total}" if steps_total else "")
