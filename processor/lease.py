"""Leases: the heartbeat that keeps a running unit's job, and which claimers count as dead.

A claimed job carries ``claimed_by`` ("host:pid") and ``lease_until``. ``Heartbeat`` renews the
leases of every job this worker holds (the one computing, and those whose writes are still
pending) from a thread every quarter of ``lease_seconds``, so a long model load or a stage
without steps keeps its job. The same thread stores each job's progress (stage and step, at
most twice a second) and reads cancel requests, so the compute loop never waits for the
database between steps. If a renewal finds a job no longer ours (another process recovered
it: this machine froze, or lost the database for longer than the lease), the job counts as
``lost`` and the runner stops at the next step boundary without publishing.

The heartbeat renews only while the worker shows signs of life (``beat()``: a progress report
or a model load starting) at least every ``stall_seconds``: a process whose compute thread
hangs lets its leases run out, so another machine resumes the jobs, instead of holding them.

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
from dataclasses import dataclass
from typing import Optional

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


@dataclass
class Held:
    """A job this worker holds: its latest progress and what the last renewal learnt."""

    progress: Optional[tuple[str, Optional[int], Optional[int]]] = None  # stage, step, steps_total
    stored: Optional[tuple[str, Optional[int], Optional[int]]] = None
    cancel_requested: bool = False
    lost: bool = False


class Heartbeat:
    """Renews the leases of the jobs this worker holds from a thread, stores their progress (at
    most twice a second) and learns of cancel requests, so that the compute loop itself never
    waits for the database between steps."""

    def __init__(self, db: Database, worker: str, lease_seconds: float, stall_seconds: float,
                 interval: Optional[float] = None, progress_interval: float = 0.5):
        self.db = db
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.stall_seconds = stall_seconds
        self.interval = interval if interval is not None else max(lease_seconds / 4, 0.1)
        self.progress_interval = progress_interval
        self._held: dict[int, Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_sign = time.monotonic()
        self._last_renewal = 0.0
        self.renewals = 0

    # What the compute loop tells --------------------------------------------------------------

    def beat(self) -> None:
        """The worker shows signs of life: keep renewing."""
        self._last_sign = time.monotonic()

    def hold(self, job_id: int) -> None:
        with self._lock:
            self._held.setdefault(job_id, Held())
        self.beat()

    def drop(self, job_id: int) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def progress(self, job_id: int, stage: str, step: Optional[int], steps_total: Optional[int]) -> None:
        """The job's current stage and step, stored by the thread: a new stage at once (so that a
        crash in it is counted for this job and stage), steps at most every ``progress_interval``."""
        self.beat()
        with self._lock:
            held = self._held.get(job_id)
            if held is None:
                return
            new_stage = held.progress is None or held.progress[0] != stage
            held.progress = (stage, step, steps_total)
        if new_stage:
            self._wake.set()

    # What the compute loop asks ---------------------------------------------------------------

    def cancel_requested(self, job_id: int) -> bool:
        with self._lock:
            held = self._held.get(job_id)
            return held is not None and held.cancel_requested

    def lost(self, job_id: int) -> bool:
        with self._lock:
            held = self._held.get(job_id)
            return held is not None and held.lost

    def stage_of(self, job_id: int) -> Optional[str]:
        """The stage last reported for a held job."""
        with self._lock:
            held = self._held.get(job_id)
            return held.progress[0] if held is not None and held.progress else None

    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    # The thread -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="qie-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        stalled = False
        while not self._stop.is_set():
            self._wake.wait(self.progress_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            silent = time.monotonic() - self._last_sign
            if silent > self.stall_seconds:
                if not stalled and self.held():
                    stalled = True
                    log.error("no progress for %.0f s; no longer renewing the leases of jobs %s, so that another "
                              "worker can take them over", silent, ", ".join(map(str, self.held())))
                continue
            stalled = False
            try:
                self.tick(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the database may be back at the next beat
                log.warning("could not renew the leases (%s); retrying in %.1f s", exc, self.progress_interval)

    def tick(self, now: float) -> None:
        """One round: store changed progress, renew the leases when due, read cancel requests."""
        with self._lock:
            held = {job_id: (h.progress, h.stored) for job_id, h in self._held.items()}
        renew = now - self._last_renewal >= self.interval
        changed = {job_id for job_id, (progress, stored) in held.items() if progress is not None and progress != stored}
        if not held or not (renew or changed):
            return
        verdicts: dict[int, tuple[bool, bool]] = {}
        with self.db.begin(durable=False) as session:
            for job_id, (progress, _) in held.items():
                if not (renew or job_id in changed):
                    continue
                stage, step, total = progress if job_id in changed else (None, None, None)
                ours = jobs.renew_lease(session, job_id, self.worker, self.lease_seconds, utcnow(),
                                        stage=stage, step=step, steps_total=total)
                verdicts[job_id] = (ours, ours and jobs.cancel_requested(session, job_id))
        if renew:
            self._last_renewal = now
            self.renewals += 1
        with self._lock:
            for job_id, (ours, cancel) in verdicts.items():
                item = self._held.get(job_id)
                if item is None:
                    continue
                if job_id in changed:
                    item.stored = held[job_id][0]
                item.cancel_requested = cancel
                if not ours and not item.lost:
                    item.lost = True
                    log.warning("job %d: lease lost (another worker took it over); stopping at the next step", job_id)
