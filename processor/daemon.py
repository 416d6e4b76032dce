"""The daemon: one process that watches, ingests, schedules and runs stages.

Signals only set flags; the loop acts on them. The first SIGTERM/SIGINT stops the running job
at its next step boundary (its checkpoint is written, the job goes back to the queue) and the
process exits 0; a second one exits at once, leaving the job to be resumed as after a crash.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from config import Settings
from db import Database, jobs, utcnow
from processor.ingest import Ingestor, ScanResult
from processor.runner import JobRunner
from processor.scheduler import Scheduler
from processor.watch import InboxWatcher, choose_mode
from stages import ModelCache, create_engine

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    """Another daemon holds this work folder."""


class FolderLock:
    """An exclusive lock on the work folder, so two daemons never share one (on one machine)."""

    def __init__(self, work: Path):
        self.path = work / ".daemon.lock"
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(f"another qie-hotfolder daemon ({holder}) is using {self.path.parent}; "
                                 "stop it first, or give this one its own work folder and database") from None
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
    def __init__(self, settings: Settings, once: bool = False):
        self.settings = settings
        self.once = once
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.lock = FolderLock(settings.work)
        self.db: Optional[Database] = None
        self.cache = ModelCache(settings.model_memory_budget)
        self._engine: Any = None
        self._watcher: Optional[InboxWatcher] = None
        self._next_scan = 0.0
        self._inbox_alarm = False
        self._signals = 0

    # Start-up -------------------------------------------------------------------------------

    def start(self) -> None:
        for folder in self.settings.folders().values():
            if folder == self.settings.inbox and not folder.parent.is_dir():
                raise FileNotFoundError(f"the inbox's parent folder {folder.parent} does not exist")
            folder.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self.db = Database(self.settings.url)
        self.ingestor = Ingestor(self.settings, self.db)
        self.scheduler = Scheduler(self.settings, self.db, self.worker)
        self.runner = JobRunner(self.settings, self.db, self.engine, self.worker, self.stop, self._progress)
        self._recover()
        if not self.once:
            mode = choose_mode(self.settings.watch_mode, self.settings.inbox)
            self._watcher = InboxWatcher(self.settings.inbox, mode, self.settings.poll_interval, self.wake)
            self._watcher.start()
        log.info("qie-hotfolder ready: inbox %s, outbox %s, engine %s, worker %s", self.settings.inbox,
                 self.settings.outbox, self.settings.engine, self.worker)

    def _recover(self) -> None:
        host = socket.gethostname()
        # The folder lock is ours, so any job this host still shows as running lost its process.
        with self.db.begin() as session:
            changed = jobs.recover_abandoned(session, utcnow(), lambda worker: (worker or "").split(":")[0] == host,
                                             self.settings.max_crashes)
        for job_id, state in changed:
            log.warning("job %d was running when the daemon stopped; now %s", job_id, state)

    def engine(self):
        """The engine, created (and its models found) on first use."""
        if self._engine is None:
            ensure_tiny_model(self.settings)
            self._engine = create_engine(self.settings, self.cache)
        return self._engine

    # The loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        self._install_signal_handlers()
        self.start()
        try:
            while not self.stop.is_set():
                busy = self.tick(time.monotonic())
                if self.once and not busy and not self._settling():
                    break
                if not busy:
                    self.wake.wait(self._idle_timeout())
        finally:
            self.shutdown()
        return 0

    def tick(self, now: float) -> bool:
        """One round: scan when due, then run one job. True when a job ran."""
        if self.wake.is_set() or now >= self._next_scan or self.ingestor.waiting:
            self.wake.clear()
            self._next_scan = now + self.settings.rescan_interval
            self._after_scan(self.ingestor.scan(now))
        if self.stop.is_set():
            return False
        job = self.scheduler.claim_next(utcnow())
        if job is None:
            return False
        self.runner.run(job)
        return True

    def _after_scan(self, result: ScanResult) -> None:
        if result.inbox_missing:
            if not self._inbox_alarm:
                self._inbox_alarm = True
                message = (f"the inbox {self.settings.inbox} is missing (share unmounted?); nothing is "
                           "failed or deleted meanwhile, waiting for it to come back")
                with self.db.begin() as session:
                    jobs.add_event(session, None, "alarm", message, level="error")
            log.error("ALARM: inbox %s is missing", self.settings.inbox)
            return
        if self._inbox_alarm:
            self._inbox_alarm = False
            log.warning("the inbox %s is back", self.settings.inbox)
            with self.db.begin() as session:
                jobs.add_event(session, None, "alarm", f"the inbox {self.settings.inbox} is back", level="warning")
            if self._watcher is not None:
                self._watcher.restart()

    def _settling(self) -> bool:
        """Candidates that will become ready by waiting (not those waiting for a missing file)."""
        return any(not w.missing for w in self.ingestor.waiting.values())

    def _idle_timeout(self) -> float:
        timeout = self.settings.rescan_interval
        if self.ingestor.waiting:
            timeout = min(timeout, max(self.settings.settle_seconds / 2, 0.1))
        if self._inbox_alarm:
            timeout = min(timeout, self.settings.poll_interval)
        retry = self.scheduler.next_retry()
        if retry is not None:
            timeout = min(timeout, max((retry - utcnow()).total_seconds(), 0.05))
        return max(timeout, 0.05)

    def _progress(self, text: str) -> None:
        log.debug("%s", text)

    # Stopping -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self._signals += 1
        if self._signals > 1:
            os.write(2, b"second signal: exiting now; the running job resumes on the next start\n")
            os._exit(130)
        self.stop.set()
        self.wake.set()

    def shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self.db is not None:
            self.db.close()
        self.lock.release()
        log.info("qie-hotfolder stopped")
