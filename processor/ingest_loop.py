"""Watching and ingest beside compute: a thread of their own.

The watcher's events wake this thread; it scans the inbox (and at least every
``rescan_interval``), settles, hashes, copies and records what is ready, and tells the compute
loop that work arrived. So a drop is queued, and visible in ``status``, within about a second
whatever the compute loop is doing (a 50-step sampling unit, a two-minute model load).

Alarms (an event of kind ``alarm`` and an ``ALARM`` line in the log; the log alone when the
database cannot take the event):

- an inbox that disappears (share unmounted) is an alarm, not an empty folder: nothing is
  failed or deleted meanwhile, and when it comes back the watcher is started again;
- an inbox that is no longer the folder being watched (moved away and made again, its link
  pointed elsewhere) or a watcher that stopped: looked at every ``poll_interval``, then
  watched again and scanned at once;
- a database that refuses a write (read-only, full, locked): ingest pauses, trying again after
  1, 2, 4... up to 60 s, from the copy it already made; ``serve --once`` gives up and exits 1;
- another daemon took the inbox's lease over (``processor/inbox_lease.py``): ingest stops.

With PostgreSQL one daemon at a time scans (an advisory lock); the others look again after
``poll_interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from sqlalchemy.exc import DBAPIError

from config import Settings
from db import Database, jobs
from processor.inbox_lease import InboxLease
from processor.ingest import Ingestor, ScanResult, top_name
from processor.watch import InboxWatcher, choose_mode

log = logging.getLogger(__name__)

DATABASE_PAUSE_MAX = 60.0


class IngestLoop:
    def __init__(self, settings: Settings, db: Database, ingestor: Ingestor,
                 on_ingested: Callable[[], None], watch: bool = True, inbox_lease: Optional[InboxLease] = None):
        self.settings = settings
        self.db = db
        self.ingestor = ingestor
        self.on_ingested = on_ingested
        self.watch = watch
        self.inbox_lease = inbox_lease
        self.wake = threading.Event()
        self.inbox_alarm = False
        self.scans = 0
        self.database_refused: Optional[str] = None  # the database's last refusal, while it lasts
        self._scanning = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._watcher: Optional[InboxWatcher] = None
        self._next_scan = 0.0
        self._next_watch_check = 0.0
        self._touched: set[str] = set()
        self._touched_lock = threading.Lock()
        self._paused_until = 0.0
        self._pause = 0.0
        self._refused_since = 0.0
        self._lease_alarm = False

    # Running beside the compute loop ------------------------------------------------------------

    def start(self) -> None:
        if self.watch:
            mode = choose_mode(self.settings.watch_mode, self.settings.inbox)
            self._watcher = InboxWatcher(self.settings.inbox, mode, self.settings.poll_interval, self.wake,
                                         on_complete=self.ingestor.tracker.saw_close, on_change=self._touch)
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
                now = time.monotonic()
                self.check_watch(now)
                self.scan_when_due(now)
            except Exception:  # noqa: BLE001 - the loop's edge: log, pause, go on watching
                log.exception("unexpected error while ingesting; trying again in a second")
                self._stop.wait(1.0)
            self.wake.wait(self.idle_timeout())  # cleared by the scan it leads to

    def _touch(self, path: Path) -> None:
        """The watcher saw ``path`` change: candidates waiting there are worth a look."""
        try:
            name = top_name(path.relative_to(self.settings.inbox).as_posix())
        except ValueError:
            return
        with self._touched_lock:
            self._touched.add(name)

    # One look -----------------------------------------------------------------------------------

    def scan_when_due(self, now: float) -> Optional[ScanResult]:
        """Scan when woken, when the rescan is due, while candidates are settling, or when one
        waiting for a missing file is due for a look; never while paused."""
        if now < self._paused_until or self._lease_lost():
            return None
        next_look = self.ingestor.next_look()
        if not (self.wake.is_set() or now >= self._next_scan or self.ingestor.settling()
                or (next_look is not None and now >= next_look)):
            return None
        self.wake.clear()
        self._next_scan = now + self.settings.rescan_interval
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        self._scanning = True
        try:
            with self.db.exclusive("ingest") as mine:
                if not mine:
                    self._next_scan = now + self.settings.poll_interval
                    return None
                result = self.ingestor.scan(now, touched)
        finally:
            self.scans += 1
            self._scanning = False
        self._after_scan(result, now)
        if result.ingested:
            self.on_ingested()
        return result

    def idle_timeout(self) -> float:
        now = time.monotonic()
        timeout = max(self._next_scan - now, 0.0)
        if self.ingestor.settling():
            settle = min(self.settings.settle_seconds, self.settings.settle_after_close)
            timeout = min(timeout, max(settle / 2, 0.05))
        next_look = self.ingestor.next_look()
        if next_look is not None:
            timeout = min(timeout, max(next_look - now, 0.0))
        if now < self._paused_until:
            timeout = max(timeout, self._paused_until - now)
        # Look at the watch itself (and, when not watching, the queue) every poll interval.
        timeout = min(timeout, self.settings.poll_interval)
        return max(timeout, 0.05)

    def settling(self) -> bool:
        """Candidates that will become ready by waiting (not those waiting for a missing file, nor
        any while the database refuses writes)."""
        return self.database_refused is None and self.ingestor.settling()

    def _after_scan(self, result: ScanResult, now: float) -> None:
        if result.database_error is not None:
            self._database_refusing(result.database_error, now)
        elif self.database_refused is not None and (result.ingested or result.failed or not result.waiting):
            self._database_accepting(now)
        if result.inbox_missing:
            if not self.inbox_alarm:
                self.inbox_alarm = True
                self.alarm(f"the inbox {self.settings.inbox} is missing (share unmounted?); nothing is "
                           "failed or deleted meanwhile, waiting for it to come back")
            else:
                log.error("ALARM: inbox %s is missing", self.settings.inbox)
            return
        if self.inbox_alarm:
            self.inbox_alarm = False
            self.alarm(f"the inbox {self.settings.inbox} is back", level="warning")
            if self._watcher is not None:
                self._watcher.restart()

    # Alarms -------------------------------------------------------------------------------------

    def alarm(self, message: str, level: str = "error") -> None:
        """An alarm as an event where the database takes it, and in the log."""
        try:
            with self.db.begin() as session:
                jobs.add_event(session, None, "alarm", message, level=level)
            stored = ""
        except DBAPIError as exc:
            stored = f" (not stored in the database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0]})"
        if level == "error":
            log.error("ALARM: %s%s", message, stored)
        else:
            log.warning("%s%s", message, stored)

    def check_watch(self, now: float) -> None:
        """Every poll interval: watch again when the watch no longer hears the inbox."""
        if self._watcher is None or now < self._next_watch_check or self.inbox_alarm:
            return
        self._next_watch_check = now + self.settings.poll_interval
        why = self._watcher.moved()
        if why is None:
            return
        self.alarm(f"{why}; watching the inbox again")
        self._watcher.restart()
        self.wake.set()  # and look at once: the new folder may hold drops already

    def _database_refusing(self, error: str, now: float) -> None:
        first = self.database_refused is None
        self.database_refused = error
        self._pause = min(max(self._pause * 2, 1.0), DATABASE_PAUSE_MAX)
        self._paused_until = now + self._pause
        if first:
            self._refused_since = now
            self.alarm(f"the database refuses writes ({error}): ingest is paused and tried again with growing "
                       "pauses (the copies already made are reused); the drops stay in the inbox, nothing is lost")
        else:
            log.warning("the database still refuses writes (%s); trying again in %.0f s", error, self._pause)
        # Connections opened while the file could not be written stay read-only: open new ones.
        self.db.engine.dispose()

    def _database_accepting(self, now: float) -> None:
        self.alarm(f"the database accepts writes again; ingest resumed after {now - self._refused_since:.0f} s "
                   f"(it refused: {self.database_refused})", level="warning")
        self.database_refused = None
        self._pause = 0.0
        self._paused_until = 0.0

    def _lease_lost(self) -> bool:
        if self.inbox_lease is None or self.inbox_lease.lost is None:
            return False
        if not self._lease_alarm:
            self._lease_alarm = True
            self.alarm(self.inbox_lease.lost)
        return True
