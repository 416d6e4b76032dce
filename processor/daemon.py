"""The daemon: the compute loop, and the threads beside it.

One thread owns the device: the compute loop (the main thread) takes the next unit of work from
the scheduler and runs it. Everything else runs beside it and meets it through the database,
the work folder and a few events, so a slow disk or a busy inbox never idles the card:

- ``qie-ingest`` (``processor/ingest_loop.py``): watching, settling, hashing, copying and
  recording new drops; a drop is queued within a second whatever the compute loop does;
- ``qie-writer`` (``processor/writer.py``): checkpoint writes and records, publishing,
  archiving, failure reports, giving jobs back to the queue;
- ``qie-heartbeat`` (``processor/lease.py``): the leases of the jobs this worker holds, their
  progress, cancel requests;
- ``qie-housekeeper``: the status file for ``run.py status``, requeueing the jobs of workers
  that died, retention.

Signals only set flags; the loop acts on them. The first SIGTERM/SIGINT stops the running job
at its next step boundary (a partial of its last step is written, the job goes back to the
queue), waits for the writer, and exits 0; a second one exits at once, leaving the job to be
resumed as after a crash.

The same class is ``run.py worker``: with ``stages`` it claims only units of those stages,
without ``ingest`` it neither watches nor scans the inbox. With PostgreSQL several daemons
share one queue and one work folder (docs/scaling.md): the folder lock is then shared (an
SQLite daemon keeps it exclusive), one of them at a time scans the inbox, and every one of them
periodically requeues jobs whose claimer died (its process is gone from this host, or its
lease expired).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from config import Settings
from db import Database, jobs, utcnow
from processor import files, health, retention
from processor.estimate import queue_estimates
from processor.faults import fault_point
from processor.inbox_lease import AlreadyRunning, InboxLease
from processor.ingest import Ingestor
from processor.ingest_loop import IngestLoop
from processor.lease import Heartbeat, is_dead
from processor.logs import job_context, report_progress
from processor.plan import Planner
from processor.prefetch import Prefetcher
from processor.runner import JobRunner
from processor.scheduler import Scheduler
from processor.services import Services
from processor.store import CheckpointStore
from processor.systemd import Notifier
from processor.writer import Writer
from stages import Engine, ModelCache, create_engine
from stages.model_cache import memory_budget

log = logging.getLogger(__name__)


class FolderLock:
    """A lock on the work folder. Exclusive with SQLite, so two daemons never share one work
    folder and database; shared with PostgreSQL, so any number of daemons share the folder (and
    the queue) but none using SQLite joins them."""

    def __init__(self, work: Path):
        self.path = work / ".daemon.lock"
        self._handle = None
        self.exclusive = False

    def acquire(self, shared: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if shared:
                raise AlreadyRunning(f"a qie-hotfolder daemon using SQLite ({holder}) holds {self.path.parent}; "
                                     "several daemons share a work folder only through PostgreSQL") from None
            raise AlreadyRunning(f"another qie-hotfolder daemon ({holder}) is using {self.path.parent}; "
                                 "stop it first, or give this one its own work folder and database "
                                 "(several daemons share one only through PostgreSQL)") from None
        except OSError as exc:
            handle.close()
            if not shared:
                raise
            # A network share without lock support: the shared lock only guards against an
            # SQLite daemon joining by mistake, so go on without it.
            log.warning("cannot lock %s (%s); going on without the folder lock", self.path, exc)
            return
        if shared:
            self._handle = handle
            return
        self.exclusive = True
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            self.exclusive = False


def write_status_file(path: Path, status: dict) -> None:
    """Replace the status file (not fsynced: it is rewritten every second and only informs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fault_point("status.write")
    tmp = files.temporary_name(path, unique=False)
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, path)


def release_free_memory() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); nothing elsewhere."""
    trim = getattr(files.libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def ensure_tiny_model(settings: Settings) -> None:
    """Build the built-in tiny model when no real model is configured (diffusers engine)."""
    if settings.engine != "diffusers" or settings.model_path is not None:
        return
    target = settings.tiny_model_path
    if not (target / "model_index.json").is_file():
        from stages.tiny_model import build_tiny_model
        log.warning("no model_path configured: building the built-in tiny random model at %s", target)
        build_tiny_model(target)
    log.warning("using the built-in TINY RANDOM model: outputs are noise. Set model_path for real edits.")


class Daemon:
    def __init__(self, settings: Settings, once: bool = False, stages: Optional[set[str]] = None,
                 ingest: bool = True, drain: bool = False):
        self.settings = settings
        self.once = once
        self.stages = stages  # None: every stage
        self.ingest = ingest  # watch and scan the inbox
        self.drain = drain  # with ``once``: exit only when no job is left to work on (workers)
        self.host = socket.gethostname()
        self.worker = f"{self.host}:{os.getpid()}"
        self.stop = threading.Event()
        self.work_arrived = threading.Event()
        self.lock = FolderLock(settings.work)
        # The inbox too: another daemon with its own work folder must not ingest the same drops.
        self.inbox_lease = InboxLease(settings.inbox, settings.work, shared=not settings.url.startswith("sqlite")) \
            if ingest else None
        self.db: Optional[Database] = None
        self.notifier = Notifier.from_environment()
        self.cache = ModelCache(settings.model_memory_budget, load_delay=settings.model_load_delay,
                                on_load=self._on_model_load)
        self.writer = Writer()
        self.intake: Optional[IngestLoop] = None
        self.prefetcher: Optional[Prefetcher] = None
        self._engine: Optional[Engine] = None
        self._engine_lock = threading.Lock()
        self._device_name: Optional[str] = None
        self._signals = 0
        self._trouble = 0  # consecutive failed rounds of the loop
        self.restart_requested = False
        self._stop_announced = False
        self._stop_lock = threading.Lock()
        self._doing: Optional[str] = None  # the last progress report, None when idle
        self._loop_at = time.time()  # the compute loop's last sign of life (an idle round, progress, a model load)
        self._housekeeper: Optional[threading.Thread] = None
        self._housekeeper_stop = threading.Event()
        self._next_recovery = 0.0
        self._next_gc = 0.0
        self._next_trim = 0.0

    # Start-up -------------------------------------------------------------------------------

    def start(self) -> None:
        self.services = Services(self.settings, daemon=self, web=not self.once)  # refuses a web server without its token
        for folder in self.settings.folders().values():
            if folder == self.settings.inbox and not folder.parent.is_dir():
                raise FileNotFoundError(f"the inbox's parent folder {folder.parent} does not exist")
            folder.mkdir(parents=True, exist_ok=True)
        files.make_private_dir(self.settings.work)  # checkpoints and copies of every input
        self.lock.acquire(shared=not self.settings.url.startswith("sqlite"))
        if self.inbox_lease is not None:
            self.inbox_lease.acquire()
        database_files = []
        if self.settings.database_url is None:  # SQLite: the queue and every prompt, owner only
            files.create_private_file(self.settings.state)
            database_files = [self.settings.state, *(self.settings.state.with_name(self.settings.state.name + suffix)
                                                     for suffix in ("-wal", "-shm"))]
        self.db = Database(self.settings.url)
        files.private_files(database_files)
        self.heartbeat = Heartbeat(self.db, self.worker, self.settings.lease_seconds,
                                   stall_seconds=max(self.settings.model_load_timeout, self.settings.lease_seconds))
        self.planner = Planner(self.settings, self.engine, self.db.shared)
        self.store = CheckpointStore(self.settings.work, self.db, self.writer,
                                     describe=self.settings.relative_to_folders)
        self.runner = JobRunner(self.settings, self.db, self.engine, self.planner, self.store, self.writer,
                                self.heartbeat, self.worker, self.stop, self._progress)
        self.scheduler = Scheduler(self.settings, self.db, self.worker, self.planner, self.store, self.runner,
                                   self.engine, stages=self.stages)
        if self.stages is not None and not self.db.shared:
            log.warning("a worker for some stages with SQLite: no other process can run the other stages "
                        "(several workers need PostgreSQL, see docs/scaling.md)")
        if self.settings.prefetch:
            # With several workers (PostgreSQL) another may take the next job: its images are not
            # prepared ahead here, only models loaded.
            self.prefetcher = Prefetcher(self.planner, self.store, self.engine, self.worker,
                                         self.settings.max_image_pixels,
                                         recorded=lambda: self.scheduler.queue.recorded,
                                         prepare=not self.db.shared)
            self.runner.before_compute = self.prefetcher.wait_for
            self.prefetcher.start()
        self.writer.start()
        self.heartbeat.start()
        self._recover()
        self._next_recovery = time.monotonic() + self.recovery_interval
        if self.ingest:
            self.intake = IngestLoop(self.settings, self.db, Ingestor(self.settings, self.db),
                                     on_ingested=self._ingested, watch=not self.once,
                                     inbox_lease=self.inbox_lease)
        self._housekeeper = threading.Thread(target=self._housekeeping, name="qie-housekeeper", daemon=True)
        self._housekeeper.start()
        self.services.start(self.db)
        log.info("qie-hotfolder ready: inbox %s, outbox %s, engine %s, worker %s, stages %s%s", self.settings.inbox,
                 self.settings.outbox, self.settings.engine, self.worker,
                 ",".join(sorted(self.stages)) if self.stages is not None else "all",
                 "" if self.ingest else " (not ingesting)")

    def _ingested(self) -> None:
        """New jobs are queued (the ingest thread tells): wake the compute loop, and record when
        the new jobs are estimated to start and finish (for their manifests)."""
        self.work_arrived.set()
        try:
            estimates = queue_estimates(self.db, utcnow())
            with self.db.begin() as session:
                jobs.record_estimates(session, {job_id: (e.start, e.finish) for job_id, e in estimates.items()})
        except Exception as exc:  # noqa: BLE001 - an estimate is never worth a failed ingest
            log.warning("could not record the estimates of the new jobs: %s", exc)

    @property
    def ingestor(self) -> Optional[Ingestor]:
        return self.intake.ingestor if self.intake is not None else None

    def engine(self) -> Engine:
        """The engine, created (and its models found) on first use, by whichever thread asks
        first; the others wait for it."""
        with self._engine_lock:
            return self._engine or self._create_engine()

    def _create_engine(self) -> Engine:
        # Importing the engine's libraries (and building the tiny model) reports no progress
        # for seconds, minutes from a cold disk: ask systemd for the time, as for a model load.
        self.notifier.extend_timeout(self.settings.model_load_timeout, f"starting the {self.settings.engine} engine")
        ensure_tiny_model(self.settings)
        if self.cache.budget_bytes is None:
            # ComfyUI moves models between GPU and RAM itself: our cache bounds RAM there.
            device = "cpu" if self.settings.engine in ("comfyui", "fake") else self.settings.device
            self.cache.budget_bytes = memory_budget(device)
        self._engine = create_engine(self.settings, self.cache)
        return self._engine

    def _recover(self) -> None:
        """Requeue jobs whose claimer died: at start-up, then every ``recovery_interval`` seconds
        (another machine may die at any time; its jobs come back when their leases expire)."""
        exclusive = self.lock.exclusive
        with self.db.begin() as session:
            changed = jobs.recover_abandoned(session, utcnow(),
                                             lambda claimer: is_dead(claimer, self.worker, self.host, exclusive),
                                             self.settings.max_crashes)
        for job_id, state in changed:
            with job_context(job_id, "recover"):
                log.warning("job %d was running in a worker that stopped (or stopped renewing its lease); now %s",
                            job_id, state)
        if changed:
            self.work_arrived.set()

    # The compute loop -----------------------------------------------------------------------

    def serve(self) -> str:
        """Run until stopped (``--once``: until nothing is left). Returns ``"restart"`` after a
        SIGHUP (the caller exits so that the service manager starts it again, with the
        configuration as it now is), ``"incomplete"`` when ``--once`` left drops in the inbox because
        the database refused writes, else ``"stopped"``."""
        self._install_signal_handlers()
        self.start()
        self.notifier.ready(f"ready: watching {self.settings.inbox}" if self.ingest else
                            f"ready: worker for {','.join(sorted(self.stages)) if self.stages else 'every stage'}")
        threading.Thread(target=self._announce_stop_when_asked, name="qie-stop-notice", daemon=True).start()
        if self.intake is not None:
            self.intake.start()
        try:
            while not self.stop.is_set():
                inbox_looked_at = self._inbox_looked_at()
                try:
                    busy = self.tick(time.monotonic())
                    self._trouble = 0
                except Exception as exc:  # noqa: BLE001 - the loop's edge: an alarm, a pause, go on serving
                    self._loop_error(exc)
                    busy = False
                self.notifier.watchdog()
                if (self.once and not busy and inbox_looked_at is not None
                        and inbox_looked_at == self._inbox_looked_at() and not self._work_left()):
                    log.info("nothing left to do (the inbox looked at %d times; %d drops not ready)",
                             inbox_looked_at, len(self.ingestor.waiting) if self.ingestor is not None else 0)
                    break
                if not busy:
                    self._idle_status()
                    self.work_arrived.wait(self._wait_seconds())
                    self.work_arrived.clear()
        finally:
            self._announce_stop()
            self.shutdown()
        if self.once and self.intake is not None and self.intake.database_refused is not None:
            log.error("serve --once: the database refuses writes (%s); what is left in the inbox was not "
                      "ingested", self.intake.database_refused)
            return "incomplete"
        return "restart" if self.restart_requested else "stopped"

    def _loop_error(self, exc: Exception) -> None:
        """An error outside any unit (a full disk, a database that refuses): log it, raise an
        alarm when the database takes it, and pause, longer each time it repeats (up to a minute)."""
        self._trouble += 1
        pause = min(2 ** (self._trouble - 1), 60.0)
        if isinstance(exc, OSError):
            log.error("ALARM: %s; pausing %.0f s", exc, pause)
        else:
            log.exception("unexpected error in the daemon loop; pausing %.0f s", pause)
        if self._trouble == 1:
            try:
                with self.db.begin() as session:
                    jobs.add_event(session, None, "alarm", f"the daemon loop failed: {exc}", level="error")
            except Exception:  # noqa: BLE001 - the database may be what fails; the log has it
                pass
        self.stop.wait(pause)

    def tick(self, now: float) -> bool:
        """One round: scan when due (when no ingest thread does it), then run one unit. True when
        one ran."""
        if self.intake is not None and not self.intake.running:
            self.intake.scan_when_due(now)
        if self.stop.is_set():
            return False
        unit = self.scheduler.next_unit(utcnow())
        if unit is None and self.writer.pending():
            self.writer.flush()  # jobs given back or published meanwhile may make units ready
            unit = self.scheduler.next_unit(utcnow())
        if unit is None:
            return False
        if self.prefetcher is not None:
            self.prefetcher.consider(unit, self.scheduler.upcoming, load_models=self.scheduler.models_fit_now)
        with job_context(unit.job.id, unit.stage):  # every log line of the unit names its job and stage
            outcome = self.runner.run(unit)
        self.scheduler.finished(unit, outcome)
        return True

    @property
    def recovery_interval(self) -> float:
        """Seconds between two looks for abandoned jobs: half a lease, at most a minute."""
        return min(max(self.settings.lease_seconds / 2, 0.5), 60.0)

    def _work_left(self) -> bool:
        """``--once``: work is still pending in the writer, or (a worker, ``drain``) jobs are
        still running or due (perhaps in other workers' stages, which will hand them on to ours).
        Always: a retry is scheduled."""
        if self.writer.pending():
            return True
        if self.scheduler.next_retry() is not None:
            return True
        if not self.drain:
            return False
        with self.db.begin() as session:
            return jobs.unfinished_due(session, utcnow()) > 0

    def _inbox_looked_at(self) -> Optional[int]:
        """How many scans of the inbox finished, when none is under way and nothing in it is about
        to settle; None while the inbox may still yield jobs. ``--once`` exits only when this was
        the same before and after a round that found no work (a scan finishing during the round
        may have queued a job the round did not see)."""
        if self.intake is None:
            return 0
        if self.intake.running:
            return self.intake.scans if self.intake.idle() else None
        return None if self.intake.settling() else self.intake.scans

    def _idle_timeout(self) -> float:
        timeout = self.settings.rescan_interval
        if self.intake is not None and self.once:
            timeout = min(timeout, self.intake.idle_timeout(), 0.1)
        if self.db.shared or not self.ingest:
            # Other processes change the queue too (or nothing here wakes this one): poll it.
            timeout = min(timeout, self.settings.poll_interval)
        if self.writer.pending():
            timeout = min(timeout, 0.05)
        retry = self.scheduler.next_retry()
        if retry is not None:
            timeout = min(timeout, max((retry - utcnow()).total_seconds(), 0.05))
        return max(timeout, 0.01)

    def _wait_seconds(self) -> float:
        """The idle wait, short enough for the next watchdog ping."""
        ping = self.notifier.seconds_to_next_ping()
        timeout = self._idle_timeout()
        return max(min(timeout, ping), 0.01) if ping is not None else timeout

    def _progress(self, text: str) -> None:
        """The runner's progress ("job 3 (x): sample step 2/8"): systemd's STATUS= (a watchdog
        ping too), and the log or the terminal's progress bar. While draining after a stop, each
        report asks systemd for ``stop_timeout`` more."""
        self._doing = text
        self._loop_at = time.time()
        if self.stop.is_set():
            self._announce_stop()
            self.notifier.extend_timeout(self.settings.stop_timeout)
        else:
            self.notifier.status(text)
        report_progress(log, text)

    def _on_model_load(self, role: str) -> None:
        """A model load reports no progress for minutes: ask systemd for the time first."""
        log.info("loading the %s model", role)
        self._loop_at = time.time()
        self.heartbeat.beat()
        self.notifier.extend_timeout(self.settings.model_load_timeout, f"loading the {role} model")

    def _idle_status(self) -> None:
        self._doing = None
        self._loop_at = time.time()
        waiting = len(self.ingestor.waiting) if self.ingestor is not None else 0
        self.notifier.status(f"idle: watching {self.settings.inbox}"
                             + (f"; {waiting} job(s) in the inbox not ready yet" if waiting else ""))

    # Beside the loop: status file, recovery, retention ----------------------------------------

    def _housekeeping(self) -> None:
        while True:
            now = time.monotonic()
            for duty in (self._write_status, self._recover_when_due, self._collect_when_due, self._trim_when_due):
                try:
                    duty(now)
                except Exception:  # noqa: BLE001 - housekeeping must not stop the daemon
                    log.exception("housekeeping (%s) failed; trying again later", duty.__name__.strip("_"))
            if self._housekeeper_stop.wait(1.0):
                return

    def _write_status(self, _now: float = 0.0) -> None:
        """``work/status/<worker>.json``: what this daemon does and holds, for ``run.py status``
        (one file per daemon, since several may share a work folder)."""
        stopped = self._doing == "stopped"
        status = {"worker": self.worker, "pid": os.getpid(), "updated_at": utcnow().isoformat() + "Z",
                  "doing": self._doing, "scheduling": self.settings.scheduling,
                  "models_loaded": {} if stopped else self.cache.sizes(), "budget_bytes": self.cache.budget_bytes,
                  "model_cache": self.cache.stats.as_dict(), "engine": self.settings.engine,
                  "device": self._device(),
                  "loop_at": datetime.fromtimestamp(self._loop_at, timezone.utc).replace(tzinfo=None).isoformat() + "Z",
                  "stall_seconds": max(self.settings.model_load_timeout, self.settings.lease_seconds),
                  "gpu_memory": health.gpu_memory()}
        write_status_file(self.settings.work / "status" / f"{self.worker.replace('/', '_')}.json", status)

    def _device(self) -> str:
        """The engine's device, asked once it exists (it does not change)."""
        if self._device_name is None and self._engine is not None:
            self._device_name = self._engine.device_name()
        return self._device_name or self.settings.device

    def _recover_when_due(self, now: float) -> None:
        if now >= self._next_recovery:
            self._next_recovery = now + self.recovery_interval
            self._recover()

    def _collect_when_due(self, now: float) -> None:
        """Retention, every ``gc_interval`` seconds (first right after start-up)."""
        if not self.settings.gc_interval or now < self._next_gc:
            return
        self._next_gc = now + self.settings.gc_interval
        with self.db.exclusive("retention") as mine:  # one daemon at a time cleans a shared work folder
            if not mine:
                return
            report = retention.collect(self.settings, self.db, utcnow())
        if report.removed:
            log.info("clean-up: %s", report.summary())

    def _trim_when_due(self, now: float) -> None:
        """Give the memory freed since the last time back to the system, once a minute: glibc keeps
        freed memory of its per-thread arenas, so with several threads handling images and tensors
        the resident size otherwise creeps up job after job (bench/soak.py)."""
        if now >= self._next_trim:
            self._next_trim = now + 60.0
            release_free_memory()

    # Stopping -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.restart_requested = True  # stop at a checkpoint, to be started again
        self._signals += 1
        if self._signals > 1:
            os.write(2, b"second signal: exiting now; the running job resumes on the next start\n")
            os._exit(130)
        self.stop.set()
        self.work_arrived.set()

    def _announce_stop_when_asked(self) -> None:
        """A signal handler only sets the flag; this thread tells systemd at once (the main
        thread may be in the middle of a step or a model load)."""
        self.stop.wait()
        self._announce_stop()

    def _announce_stop(self) -> None:
        """STOPPING=1 to systemd, once, with the time a graceful stop may take."""
        with self._stop_lock:
            if self._stop_announced:
                return
            self._stop_announced = True
        doing = self._doing
        if self.stop.is_set():
            log.info("stop requested: %s", f"finishing the current step of {doing}" if doing else "exiting")
            self.notifier.stopping("stopping" + (f": finishing the current step of {doing}" if doing else ""))
            self.notifier.extend_timeout(self.settings.stop_timeout)
        else:
            self.notifier.stopping("stopping: nothing left to do")

    def shutdown(self) -> None:
        """Stop the threads beside the loop, hand back the job held and wait for the writer. Each
        step is tried whatever the previous one did (a full disk must not leave jobs claimed)."""
        steps = [("web and notifications", self.services.stop if getattr(self, "services", None) else None),
                 ("ingest", self.intake.stop if self.intake is not None else None),
                 ("prefetch", self.prefetcher.stop if self.prefetcher is not None else None),
                 ("housekeeper", self._stop_housekeeper)]
        if self.db is not None:
            steps += [("held job", lambda: self.scheduler.release_held("stopped between stages; will resume")),
                      ("writer", self.writer.stop), ("heartbeat", self.heartbeat.stop),
                      ("status file", self._write_final_status), ("database", self.db.close)]
        if self.inbox_lease is not None:
            steps.append(("inbox lease", self.inbox_lease.release))
        steps += [("folder lock", self.lock.release), ("systemd", self.notifier.close)]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - stopping goes on; what failed is logged
                log.error("while stopping (%s): %s", what, exc)
        log.info("qie-hotfolder stopped")

    def _stop_housekeeper(self) -> None:
        self._housekeeper_stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=30)

    def _write_final_status(self) -> None:
        self._doing = "stopped"
        self._write_status()
