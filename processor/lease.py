"""Leases: the heartbeat that keeps a running unit's job, and which claimers count as dead.

A claimed job carries ``claimed_by`` ("host:pid") and ``lease_until``. While a unit runs,
``Heartbeat`` renews the lease from a thread every quarter of ``lease_seconds``, so a long
model load or a stage without steps keeps its job; the runner also renews at the start of a
stage and after every sampling step. If a renewal finds the job no longer ours (another
process recovered it: this machine froze, or lost the database for longer than the lease),
``lost`` is set and the runner stops at the next step boundary without publishing.

The heartbeat renews only while the unit shows signs of life (``beat()``: a progress report
or a model load starting) at least every ``stall_seconds``: a process whose main thread hangs
lets its lease run out, so another machine resumes the job, instead of holding it for ever.

Who is dead (``is_dead``): a claimer on another machine only when its lease has expired
(``recover_abandoned`` checks that); on this machine at once when its process is gone, and,
when this daemon holds the work folder exclusively (SQLite), every claimer of this host but
itself, since no other daemon can be running here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from db import Database, jobs, utcnow

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (of any user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(claimed_by: Optional[str], me: str, host: str, exclusive: bool) -> bool:
    """Whether the claimer ``claimed_by`` ("host:pid") is known to be gone, seen from worker ``me``
    on ``host``; ``exclusive``: this process holds the work folder alone (SQLite)."""
    if not claimed_by:
        return True
    if claimed_by == me:
        return False
    claimer_host, _, pid = claimed_by.rpartition(":")
    if claimer_host != host:
        return False  # another machine: only its lease tells
    if exclusive:
        return True
    return not (pid.isdigit() and pid_alive(int(pid)))


class Heartbeat:
    def __init__(self, db: Database, worker: str, lease_seconds: float, stall_seconds: float,
                 interval: Optional[float] = None):
        self.db = db
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.stall_seconds = stall_seconds
        self.interval = interval if interval is not None else max(lease_seconds / 4, 0.1)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._last_sign = time.monotonic()
        self.renewals = 0

    def beat(self) -> None:
        """The unit shows progress: keep renewing."""
        self._last_sign = time.monotonic()

    @contextmanager
    def holding(self, job_id: int) -> Iterator["Heartbeat"]:
        """Renew the lease of ``job_id`` in a thread while the block runs."""
        self.lost.clear()
        self._stop.clear()
        self.beat()
        thread = threading.Thread(target=self._run, args=(job_id,), name=f"qie-heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _run(self, job_id: int) -> None:
        stalled = False
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._last_sign
            if silent > self.stall_seconds:
                if not stalled:
                    stalled = True
                    log.error("job %d: no progress for %.0f s; no longer renewing its lease, so that another "
                              "worker can take it over", job_id, silent)
                continue
            stalled = False
            try:
                with self.db.begin() as session:
                    ours = jobs.renew_lease(session, job_id, self.worker, self.lease_seconds, utcnow())
            except Exception as exc:  # noqa: BLE001 - the database may be back at the next beat
                log.warning("job %d: could not renew the lease (%s); retrying in %.1f s", job_id, exc, self.interval)
                continue
            if not ours:
                if not self._stop.is_set():  # else the unit has just given the job back itself
                    log.warning("job %d: lease lost (another worker took it over); stopping at the next step",
                                job_id)
                self.lost.set()
                return
            self.renewals += 1
