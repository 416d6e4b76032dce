"""Watching and ingest beside compute: a thread of their own.

The watcher's events wake this thread; it scans the inbox (and at least every
``rescan_interval``), settles, hashes, copies and records what is ready, and tells the compute
loop that work arrived. So a drop is queued, and visible in ``status``, within about a second
whatever the compute loop is doing (a 50-step sampling unit, a two-minute model load).

An inbox that disappears (share unmounted) is an alarm, not an empty folder: nothing is failed
or deleted meanwhile, and when it comes back the watcher is started again. With PostgreSQL one
daemon at a time scans (an advisory lock); the others look again after ``poll_interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from config import Settings
from db import Database, jobs
from processor.ingest import Ingestor, ScanResult
from processor.watch import InboxWatcher, choose_mode

log = logging.getLogger(__name__)


class IngestLoop:
    def __init__(self, settings: Settings, db: Database, ingestor: Ingestor,
                 on_ingested: Callable[[], None], watch: bool = True):
        self.settings = settings
        self.db = db
        self.ingestor = ingestor
        self.on_ingested = on_ingested
        self.watch = watch
        self.wake = threading.Event()
        self.inbox_alarm = False
        self.scans = 0
        self._scanning = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watcher: Optional[InboxWatcher] = None
        self._next_scan = 0.0

    # Running beside the compute loop ------------------------------------------------------------

    def start(self) -> None:
        if self.watch:
            mode = choose_mode(self.settings.watch_mode, self.settings.inbox)
            self._watcher = InboxWatcher(self.settings.inbox, mode, self.settings.poll_interval, self.wake,
                                         on_complete=self.ingestor.tracker.saw_close)
            self._watcher.start()
        self._thread = threading.Thread(target=self._run, name="qie-ingest", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def idle(self) -> bool:
        """Looked at the inbox at least once, not looking now, nothing about to settle."""
        return self.scans > 0 and not self._scanning and not self.settling()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_when_due(time.monotonic())
            except Exception:  # noqa: BLE001 - the loop's edge: log, pause, go on watching
                log.exception("unexpected error while ingesting; trying again in a second")
                self._stop.wait(1.0)
            self.wake.wait(self.idle_timeout())  # cleared by the scan it leads to

    # One look -----------------------------------------------------------------------------------

    def scan_when_due(self, now: float) -> Optional[ScanResult]:
        """Scan when woken, when the rescan is due, or while candidates are settling."""
        if not (self.wake.is_set() or now >= self._next_scan or self.ingestor.waiting):
            return None
        self.wake.clear()
        self._next_scan = now + self.settings.rescan_interval
        self._scanning = True
        try:
            with self.db.exclusive("ingest") as mine:
                if not mine:
                    self._next_scan = now + self.settings.poll_interval
                    return None
                result = self.ingestor.scan(now)
        finally:
            self.scans += 1
            self._scanning = False
        self._after_scan(result)
        if result.ingested:
            self.on_ingested()
        return result

    def idle_timeout(self) -> float:
        timeout = max(self._next_scan - time.monotonic(), 0.0)
        if self.ingestor.waiting:
            settle = min(self.settings.settle_seconds, self.settings.settle_after_close)
            timeout = min(timeout, max(settle / 2, 0.05))
        if self.inbox_alarm or self._watcher is None or self.db.shared:
            timeout = min(timeout, self.settings.poll_interval)
        return max(timeout, 0.05)

    def settling(self) -> bool:
        """Candidates that will become ready by waiting (not those waiting for a missing file)."""
        return any(not w.missing for w in self.ingestor.waiting.values())

    def _after_scan(self, result: ScanResult) -> None:
        if result.inbox_missing:
            if not self.inbox_alarm:
                self.inbox_alarm = True
                message = (f"the inbox {self.settings.inbox} is missing (share unmounted?); nothing is "
                           "failed or deleted meanwhile, waiting for it to come back")
                with self.db.begin() as session:
                    jobs.add_event(session, None, "alarm", message, level="error")
            log.error("ALARM: inbox %s is missing", self.settings.inbox)
            return
        if self.inbox_alarm:
            self.inbox_alarm = False
            log.warning("the inbox %s is back", self.settings.inbox)
            with self.db.begin() as session:
                jobs.add_event(session, None, "alarm", f"the inbox {self.settings.inbox} is back", level="warning")
            if self._watcher is not None:
                self._watcher.restart()
