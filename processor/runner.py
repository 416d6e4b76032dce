"""Running one unit of work: a stage of a job, with checkpoints; publishing after ``decode``.

The scheduler asks ``plan`` and ``next_stages`` what a job still needs: walking back from
``decode``, every stage without a recorded checkpoint is needed, and the needed stages whose
inputs all exist can run now. So a job resumes at the first missing checkpoint, a changed seed
reruns only ``sample`` and ``decode``, and a seed sweep encodes once. ``run_unit`` computes one
stage from the checkpoints it reads (verified against their recorded sha256; a bad one is
recomputed, never trusted), records it, and gives the job back to the queue, so that the
scheduler can run the same stage for other jobs while its models are loaded.
``sample`` writes partials and resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

from sqlalchemy.orm import Session

from config import Settings, StageParameters
from db import Database, Job, checkpoints, jobs, utcnow
from processor import publish
from processor.faults import fault_point
from processor.inbox import remove_empty_dirs
from processor.logs import job_context
from stages import (BY_NAME, STAGE_NAMES, JobInputs, SampleResume, StageContext, StageInterrupted, classify,
                    compute, fingerprint_chain)
from stages import checkpoint as ckpt
from stages.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

PUBLISH = "publish"  # the unit that publishes a job whose decode checkpoint already exists


class JobStopped(Exception):
    """The job was interrupted at a step boundary (shutdown or cancel)."""


@dataclass
class JobPlan:
    """What a job computes: its stage inputs and the fingerprint of every stage."""

    job_id: int
    params: StageParameters
    ctx: StageContext
    identities: dict[str, str]
    chain: dict[str, str]
    engine_id: str


@dataclass
class Unit:
    """One unit of work: ``stage`` of ``job`` (or publishing it); ``error`` when it cannot be planned."""

    job: Job
    stage: str
    models: tuple[str, ...] = ()
    error: Optional[Exception] = None
    run_id: Optional[int] = None  # its stage run record, opened in the claiming transaction


class PayloadMemo:
    """Recently written or verified checkpoint payloads (with their sha256), so the next stage
    need not re-read them."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: "OrderedDict[str, tuple[Any, int]]" = OrderedDict()

    def get(self, fingerprint: str) -> Any:
        item = self._items.get(fingerprint)
        if item is None:
            return None
        self._items.move_to_end(fingerprint)
        return item[0]

    def put(self, fingerprint: str, payload: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        self._items[fingerprint] = (payload, size)
        self._items.move_to_end(fingerprint)
        while sum(s for _, s in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)


class JobRunner:
    def __init__(self, settings: Settings, db: Database, engine_factory: Callable[[], Any], worker: str,
                 stop: threading.Event, progress: Optional[Callable[[str], None]] = None):
        self.settings = settings
        self.db = db
        self._engine_factory = engine_factory
        self.worker = worker
        self.stop = stop
        self.progress = progress or (lambda _text: None)
        self.lease_lost: Callable[[], bool] = lambda: False  # the daemon's heartbeat found the job taken over
        self.cache_dir = settings.work / "cache"
        self._cancel_checked = 0.0
        self._plans: dict[int, JobPlan] = {}
        self._memo = PayloadMemo()
        self._used: set[tuple[int, str]] = set()  # (job, stage) whose use of a checkpoint is recorded
        self._unit_start_loads: Counter = Counter()
        self.model_loads: dict[int, Counter] = {}

    @property
    def engine(self):
        return self._engine_factory()

    # Planning --------------------------------------------------------------------------------------

    def plan(self, job: Job) -> JobPlan:
        """The job's fingerprints (computed once per process; model files are looked up here)."""
        plan = self._plans.get(job.id)
        if plan is not None:
            return plan
        spec = job.spec
        params = StageParameters.model_validate(spec["parameters"])
        inputs = JobInputs(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], seed=spec["seed"],
                           images=tuple((i["key"], i["sha256"]) for i in _images(job)))
        originals = Path(job.work_dir) / "originals"
        ctx = StageContext(job=inputs, params=params, max_image_pixels=self.settings.max_image_pixels,
                           image_paths=tuple((i["key"], originals / i["name"]) for i in _images(job)))
        engine = self.engine
        identities = engine.model_identities(params)
        engine_id = f"{engine.name} {engine.version()}"
        if not self.db.shared:
            # One machine: its device is part of the identity. Several (PostgreSQL): checkpoints
            # are exchanged between cards, so every worker must derive the same fingerprints from
            # engine, version, model files and dtype alone (docs/scaling.md).
            engine_id += f" on {engine.device_name()}"
        plan = JobPlan(job.id, params, ctx, identities, fingerprint_chain(inputs, params, engine_id, identities),
                       engine_id)
        self._plans[job.id] = plan
        return plan

    def next_stages(self, plan: JobPlan, recorded: set[str]) -> list[str]:
        """Stages of the job that can run now, given the set of fingerprints with a checkpoint."""
        if plan.chain["decode"] in recorded:
            return [PUBLISH]
        needed: list[str] = []
        pending = ["decode"]
        while pending:
            name = pending.pop()
            if name in needed or plan.chain[name] in recorded:
                continue
            needed.append(name)
            pending.extend(BY_NAME[name].reads)
        return [name for name in STAGE_NAMES if name in needed
                and all(plan.chain[read] in recorded for read in BY_NAME[name].reads)]

    def stage_models(self, stage: str) -> tuple[str, ...]:
        """Model roles the engine loads for ``stage`` (the engine may need fewer than it fingerprints)."""
        if stage == PUBLISH:
            return ()
        engine_models = getattr(self.engine, "stage_models", None)
        return tuple(engine_models(stage)) if engine_models else BY_NAME[stage].models

    def forget(self, job_id: int) -> None:
        self._plans.pop(job_id, None)
        self._used = {used for used in self._used if used[0] != job_id}

    # Running a unit --------------------------------------------------------------------------------

    def open_unit(self, session: Session, unit: Unit) -> None:
        """In the transaction that claims ``unit``: show its stage as the job's progress and open
        its run record, when the job's use of every input is recorded already (else the run is
        opened after those uses, so that a job's runs read in the order they happened)."""
        if unit.error is not None or unit.stage == PUBLISH:
            return
        if all((unit.job.id, read) in self._used for read in BY_NAME[unit.stage].reads):
            unit.run_id = self._open_run(session, unit.job, self.plan(unit.job), unit.stage)

    def _open_run(self, session: Session, job: Job, plan: JobPlan, name: str) -> int:
        self._store_progress(session, job, name, None, plan.params.steps if name == "sample" else None)
        return checkpoints.start_run(session, job.id, name, plan.chain[name], self.engine.device_name(), self.worker)

    def run_unit(self, unit: Unit) -> str:
        """Run a claimed unit; returns the state the job is left in."""
        job = unit.job
        self._unit_start_loads = self._cache_loads()
        try:
            if unit.error is not None:
                raise unit.error
            state = self._run_stage(unit)
        except JobStopped:
            state = self._stopped(job)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            state = self._failed(job, exc)
        finally:
            self.model_loads.setdefault(job.id, Counter()).update(self._unit_loads())
        if state in ("done", "failed", "cancelled"):
            self.forget(job.id)
        return state

    def _run_stage(self, unit: Unit) -> str:
        job, stage = unit.job, unit.stage
        plan = self.plan(job)
        if stage == PUBLISH:
            decoded = self._obtain("decode", job, plan)
        else:
            inputs = {read: self._obtain(read, job, plan) for read in BY_NAME[stage].reads}
            # Before decode, the job goes back to the queue in the transaction that records the checkpoint.
            hand_back = None if stage == "decode" else (
                lambda session: jobs.release_between_stages(session, job.id, self.worker))
            decoded = self._compute(stage, job, plan, inputs, unit.run_id, then=hand_back)
            if hand_back is not None:
                return "queued"
        result = self._publish(job, plan, decoded["image"])
        with self.db.begin() as session:
            jobs.mark_done(session, job.id, self.worker, result)
        log.info("job %d done: %s", job.id, result["image"])
        return "done"

    def _obtain(self, name: str, job: Job, plan: JobPlan) -> Any:
        """A stage's payload: from memory, from its verified checkpoint, or computed again."""
        fingerprint = plan.chain[name]
        remembered = self._memo.get(fingerprint)
        if remembered is not None:
            payload, sha = remembered
            self._note_use(job, name, fingerprint, sha)
            return payload
        with job_context(job.id, name):
            payload = self._load_checkpoint(name, fingerprint, job)
            if payload is None:
                inputs = {read: self._obtain(read, job, plan) for read in BY_NAME[name].reads}
                payload = self._compute(name, job, plan, inputs)
        return payload

    def _load_checkpoint(self, name: str, fingerprint: str, job: Job) -> Any:
        with self.db.begin() as session:
            row = checkpoints.lookup(session, fingerprint)
            recorded = (row.path, row.sha256, row.size) if row else None
        if recorded is None:
            return None
        try:
            payload = ckpt.load(Path(recorded[0]), recorded[1])
        except ckpt.CheckpointError as exc:
            log.warning("job %d: %s checkpoint not usable (%s); recomputing", job.id, name, exc)
            with self.db.begin() as session:
                checkpoints.forget(session, fingerprint)
                jobs.add_event(session, job.id, "checkpoint", f"{name}: {exc}; recomputed", level="warning")
            return None
        self._note_use(job, name, fingerprint, recorded[1])
        self._memo.put(fingerprint, (payload, recorded[1]), recorded[2])
        return payload

    def _note_use(self, job: Job, name: str, fingerprint: str, sha: str) -> None:
        """Record, once per job, that it reused a checkpoint (computed by an earlier job or life)."""
        if (job.id, name) in self._used:
            return
        with self.db.begin() as session:
            if not checkpoints.has_run(session, job.id, name, fingerprint):
                checkpoints.record_hit(session, job.id, name, fingerprint, sha, self.engine.device_name(),
                                       self.worker)
                log.info("job %d: %s reused from checkpoint %s", job.id, name, fingerprint[:12])
            else:
                checkpoints.touch(session, fingerprint)
        self._used.add((job.id, name))

    def _compute(self, name: str, job: Job, plan: JobPlan, inputs: dict, run_id: Optional[int] = None,
                 then: Optional[Callable[[Session], None]] = None) -> Any:
        """Compute stage ``name`` and record its checkpoint; ``then`` runs in the recording
        transaction. ``run_id``: the run record opened when the unit was claimed, else one is opened."""
        fingerprint = plan.chain[name]
        resume, partials_found = self._resume_point(fingerprint) if name == "sample" else (None, False)
        steps_total = plan.params.steps if name == "sample" else None
        resumed_from = resume.step if resume else None
        if run_id is None:
            with self.db.begin() as session:
                run_id = self._open_run(session, job, plan, name)
        self.progress(_progress_text(job, name, resumed_from, steps_total))
        fault_point(f"stage.{name}")
        fault_point(f"job.{job.name}.stage.{name}")
        started = time.perf_counter()
        recorder = StepRecorder(self, job, fingerprint, steps_total) if name == "sample" else None
        try:
            payload = compute(name, self.engine, inputs, plan.ctx, resume=resume, on_step=recorder,
                              should_stop=lambda: self._should_stop(job))
        except Exception as exc:
            interrupted = isinstance(exc, StageInterrupted)
            with self.db.begin() as session:
                checkpoints.finish_run(session, run_id, None, time.perf_counter() - started, resumed_from,
                                       error="interrupted" if interrupted else str(exc))
            if interrupted:
                raise JobStopped(name) from exc
            raise
        path, sha, size = self._write(name, fingerprint, payload)
        stale: list[str] = []
        with self.db.begin() as session:
            checkpoints.record(session, fingerprint, name, str(path), sha, size)
            checkpoints.finish_run(session, run_id, sha, time.perf_counter() - started, resumed_from)
            if partials_found or (recorder is not None and recorder.wrote_partials):
                stale = self._forget_partials(session, fingerprint)
            if then is not None:
                then(session)
        _unlink(stale)
        self._memo.put(fingerprint, (payload, sha), size)
        self._used.add((job.id, name))
        log.info("job %d: %s computed in %.3fs", job.id, name, time.perf_counter() - started)
        return payload

    def _write(self, name: str, fingerprint: str, payload: Any) -> tuple[Path, str, int]:
        """Write a checkpoint file; the caller records it in the index."""
        path = self.cache_dir / name / f"{fingerprint}.safetensors"
        try:
            fault_point("checkpoint.write")
            sha = ckpt.save(path, payload, {"qie.stage": name, "qie.fingerprint": fingerprint},
                            before_rename=lambda: fault_point("checkpoint.rename"))
        except OSError as exc:
            raise RetryableError(f"cannot write the {name} checkpoint {path}: {exc}") from exc
        fault_point("checkpoint.written")
        return path, sha, path.stat().st_size

    # Sampling partials ---------------------------------------------------------------------------

    def _resume_point(self, fingerprint: str) -> tuple[Optional[SampleResume], bool]:
        """The newest usable partial of a ``sample`` run, and whether any partial was recorded."""
        with self.db.begin() as session:
            found = [(checkpoints.partial_step(r), r.path, r.sha256) for r in checkpoints.partials(session, fingerprint)]
        for step, path, sha in found:
            try:
                state = ckpt.load(Path(path), sha)
            except ckpt.CheckpointError as exc:
                log.warning("partial %s not usable (%s)", path, exc)
                continue
            log.info("sample resumes after step %d", step)
            return SampleResume(step=step, state=state), True
        return None, bool(found)

    def _store_step(self, job: Job, fingerprint: str, step: int, steps_total: Optional[int],
                    partial_state: Any = None) -> None:
        """Store the progress of a sample run, with a partial (replacing the older ones) when given."""
        stale: list[str] = []
        with self.db.begin() as session:
            if partial_state is not None:
                partial = checkpoints.partial_fingerprint(fingerprint, step)
                path, sha, size = self._write("sample", partial, partial_state)
                stale = self._forget_partials(session, fingerprint, keep=partial)
                checkpoints.record(session, partial, "sample", str(path), sha, size)
            self._store_progress(session, job, "sample", step, steps_total)
        _unlink(stale)

    def _forget_partials(self, session: Session, fingerprint: str, keep: Optional[str] = None) -> list[str]:
        """Unrecord the partials of a ``sample`` run but ``keep``; their paths, to remove once committed."""
        stale = [(r.fingerprint, r.path) for r in checkpoints.partials(session, fingerprint) if r.fingerprint != keep]
        for partial, _ in stale:
            checkpoints.forget(session, partial)
        return [path for _, path in stale]

    # Progress and stopping -------------------------------------------------------------------------

    def _store_progress(self, session: Session, job: Job, stage: str, step: Optional[int],
                        steps_total: Optional[int]) -> None:
        """Renew the lease and store the stage and step, in the caller's transaction."""
        if not jobs.renew_lease(session, job.id, self.worker, self.settings.lease_seconds, utcnow(),
                                stage=stage, step=step, steps_total=steps_total):
            raise JobStopped("lease lost")

    def _should_stop(self, job: Job) -> bool:
        """A shutdown was asked for, or (looked up at most once a second) a cancel."""
        if self.stop.is_set() or self.lease_lost():
            return True
        now = time.monotonic()
        if now - self._cancel_checked < 1.0:
            return False
        self._cancel_checked = now
        with self.db.begin() as session:
            return jobs.cancel_requested(session, job.id)

    def _lost(self, job: Job) -> bool:
        """Whether another worker took the job over (our lease expired); then it is theirs to finish."""
        with self.db.begin() as session:
            if jobs.holds(session, job.id, self.worker):
                return False
        log.warning("job %d: lease lost (another worker took it over); leaving it to them", job.id)
        return True

    def _stopped(self, job: Job) -> str:
        if self._lost(job):
            return "lost"
        with self.db.begin() as session:
            if jobs.cancel_requested(session, job.id):
                jobs.mark_cancelled(session, job.id, self.worker)
                return "cancelled"
            jobs.release(session, job.id, self.worker, "stopped at a step boundary; will resume")
        log.info("job %d released at a checkpoint", job.id)
        return "queued"

    # Failure ---------------------------------------------------------------------------------------

    def _failed(self, job: Job, exc: Exception) -> str:
        if self._lost(job):
            return "lost"
        kind = classify(exc)
        message = str(exc) or type(exc).__name__
        with self.db.begin() as session:
            current = jobs.get_job(session, job.id)
            attempts = (current.attempts if current else job.attempts) + 1
        if kind is RetryableError and attempts < self.settings.max_attempts:
            delay = self.settings.retry_backoff * (2 ** (attempts - 1))
            at = utcnow() + timedelta(seconds=delay)
            log.warning("job %d: transient error (attempt %d of %d): %s; retry in %.0fs",
                        job.id, attempts, self.settings.max_attempts, message, delay)
            with self.db.begin() as session:
                jobs.schedule_retry(session, job.id, self.worker, message, at)
            return "queued"
        if kind is PermanentError:
            log.error("job %d failed: %s", job.id, message, exc_info=not isinstance(exc, PermanentError))
        else:
            message = f"{message} (gave up after {attempts} attempts)"
            log.error("job %d failed: %s", job.id, message)
        report = {"job_id": job.id, "job": job.name, "source": job.source, "error": message,
                  "kind": "permanent" if kind is PermanentError else "transient",
                  "stage": _current_stage(self.db, job.id), "attempts": attempts,
                  "exception": type(exc).__name__}
        publish.report_failed(self.settings, job.name, Path(job.work_dir) / "originals", report)
        with self.db.begin() as session:
            jobs.mark_failed(session, job.id, self.worker, message, report["kind"])
        return "failed"

    # Publishing ------------------------------------------------------------------------------------

    def _publish(self, job: Job, plan: JobPlan, image) -> dict:
        params = plan.params
        outbox = publish.outbox_for(self.settings, job.spec)
        with self.db.begin() as session:
            # A worker that lost its job must not publish it too.
            if not jobs.renew_lease(session, job.id, self.worker, self.settings.lease_seconds, utcnow()):
                raise JobStopped("lease lost")
            row = jobs.get_job(session, job.id)
            reserved = row.output_name
            if reserved is None:
                reserved = publish.choose_output_name(outbox, job.spec["output_name"], params.output_format)
                jobs.reserve_output_name(session, job.id, reserved)
            manifest = self._manifest(job, plan, row, checkpoints.runs_for(session, job.id))
            keep_originals = jobs.siblings_unfinished(session, job.id, job.work_dir)
        text = {"parameters": json.dumps({"prompt": job.spec["prompt"], "negative_prompt": job.spec["negative_prompt"],
                                          "seed": job.spec["seed"], **params.model_dump(mode="json")},
                                         sort_keys=True),
                "software": "qie-hotfolder"}
        data = publish.image_bytes(image, params.output_format, params.quality, text)
        manifest["output"] = {"width": int(image.shape[1]), "height": int(image.shape[0]),
                              "format": params.output_format}
        result = publish.publish(outbox, reserved, data, params.output_format, manifest)
        result["originals"] = "kept for the other jobs of the same drop" if keep_originals else self._archive(job)
        return result

    def _archive(self, job: Job) -> str:
        """Archive (or delete) the originals, which no other job made from the same drop still needs."""
        archived = publish.archive_originals(self.settings, job.id, job.name, Path(job.work_dir) / "originals")
        remove_empty_dirs(Path(job.work_dir))
        return str(archived) if archived else self.settings.originals

    def _manifest(self, job: Job, plan: JobPlan, row: Job, runs: list) -> dict:
        engine = self.engine
        stage_rows = [{"stage": r.stage, "fingerprint": r.fingerprint, "cache_hit": r.cache_hit,
                       "duration_s": round(r.duration_s or 0.0, 4), "resumed_from_step": r.resumed_from_step,
                       "device": r.device, "worker": r.worker, "checkpoint_sha256": r.checkpoint_sha256,
                       "error": r.error, "at": r.started_at.isoformat(timespec="seconds") + "Z"}
                      for r in runs]
        cache = getattr(engine, "cache", None)
        return {
            "job": {"id": job.id, "name": job.name, "source": job.source,
                    "created_at": job.created_at.isoformat(timespec="seconds") + "Z",
                    "attempts": row.attempts, "crashes": row.crashes},
            "job_file": job.spec["job_file"],
            "prompt": job.spec["prompt"],
            "negative_prompt": job.spec["negative_prompt"],
            "seed": job.spec["seed"],
            "seed_source": job.spec["seed_source"],
            "parameters": plan.params.model_dump(mode="json"),
            "inputs": job.inputs,
            "engine": {"name": engine.name, "version": engine.version(), "device": engine.device_name(),
                       "threads": self.settings.effective_threads},
            "models": plan.identities,
            "fingerprints": plan.chain,
            "stages": stage_rows,
            "model_loads_for_this_job": dict(self.model_loads.get(job.id, Counter()) + self._unit_loads()),
            "model_cache": cache.stats.as_dict() if cache is not None else None,
            "host": platform.node(),
            "published_at": utcnow().isoformat(timespec="seconds") + "Z",
        }

    def _cache_loads(self) -> Counter:
        try:
            cache = getattr(self.engine, "cache", None)
        except Exception:  # noqa: BLE001 - an engine that cannot start fails the job elsewhere
            return Counter()
        return Counter(cache.stats.loads) if cache is not None else Counter()

    def _unit_loads(self) -> Counter:
        """Models loaded since the current unit started."""
        return self._cache_loads() - self._unit_start_loads


class StepRecorder:
    """``on_step`` of a sample run: progress after every step, stored at most twice a second (the
    heartbeat keeps the lease meanwhile, and the checkpoint follows the last step at once); a
    partial when ``partial_interval`` seconds passed since the last one."""

    def __init__(self, runner: JobRunner, job: Job, fingerprint: str, steps_total: Optional[int]):
        self.runner = runner
        self.job = job
        self.fingerprint = fingerprint
        self.steps_total = steps_total
        self.wrote_partials = False
        self._last_partial = self._last_stored = time.monotonic()

    def __call__(self, step: int, state: Any) -> None:
        now = time.monotonic()
        settings = self.runner.settings
        partial_due = bool(settings.save_partials and self.steps_total and step < self.steps_total
                           and now - self._last_partial >= settings.partial_interval)
        if partial_due or (step != self.steps_total and now - self._last_stored >= 0.5):
            self.runner._store_step(self.job, self.fingerprint, step, self.steps_total,
                                    state if partial_due else None)
            self._last_stored = now
            if partial_due:
                self._last_partial = now
                self.wrote_partials = True
        self.runner.progress(_progress_text(self.job, "sample", step, self.steps_total))
        fault_point(f"stage.sample.step{step}")


def _unlink(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _progress_text(job: Job, stage: str, step: Optional[int], steps_total: Optional[int]) -> str:
    return f"job {job.id} ({job.name}): {stage}" + (f" step {step or 0}/{steps_total}" if steps_total else "")


def _images(job: Job) -> list[dict]:
    order = {"image1": 0, "image2": 1, "image3": 2}
    return sorted((i for i in job.inputs if i.get("key")), key=lambda i: order[i["key"]])


def _current_stage(db: Database, job_id: int) -> Optional[str]:
    with db.begin() as session:
        row = jobs.get_job(session, job_id)
        return row.stage if row else None
