"""The writer: the disk work of finished units, done beside the compute loop.

When a stage's result is computed, the compute loop keeps it in memory for the next stage and
hands the rest to this thread: encoding and hashing the checkpoint, writing and fsyncing it,
recording it in the database, finishing the stage run, publishing the image and manifest,
archiving the originals, writing failure reports, giving jobs back to the queue. So on a GPU
box the card computes the next unit while the CPU writes the last one.

Durability stays as it was: a stage counts as done (its checkpoint is recorded) only after its
file is durable, and every task of a job runs in the order it was handed over (one queue, one
thread), so a job is released or published only after its checkpoints are recorded. A crash
loses only tasks not done yet; the database then says the stages were not done, and the job
resumes from its durable checkpoints with identical bytes.

The compute loop waits for the disk only when it must: the queue is bounded (a slow disk slows
the loop rather than filling memory), and ``flush()`` waits for everything handed over (before
stopping, and before reading a job whose tasks are still pending).

A task that fails is logged and remembered for its job (``failure(job_id)``): the compute loop
then fails or retries the job through the normal error path.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from processor.logs import job_context

log = logging.getLogger(__name__)


@dataclass
class Task:
    job_id: Optional[int]
    what: str  # for logs: "record sample", "publish", ...
    run: Callable[[], None]
    stage: Optional[str] = None


class Writer:
    def __init__(self, max_pending: int = 4, name: str = "qie-writer"):
        self._queue: "queue.Queue[Optional[Task]]" = queue.Queue(maxsize=max_pending)
        self._idle = threading.Condition()
        self._pending = 0
        self._pending_by_job: dict[Optional[int], int] = {}
        self._failures: dict[int, BaseException] = {}
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, job_id: Optional[int], what: str, run: Callable[[], None], stage: Optional[str] = None) -> None:
        """Hand a task over; blocks while ``max_pending`` tasks wait (the disk is slow)."""
        with self._idle:
            self._pending += 1
            self._pending_by_job[job_id] = self._pending_by_job.get(job_id, 0) + 1
        task = Task(job_id, what, run, stage)
        if not self._started:  # no thread (tests of a single part): run at once
            self._run(task)
            return
        self._queue.put(task)

    def pending(self, job_id: Optional[int] = None) -> int:
        """Tasks not done yet, of one job or of all."""
        with self._idle:
            return self._pending if job_id is None else self._pending_by_job.get(job_id, 0)

    def flush(self, job_id: Optional[int] = None, timeout: Optional[float] = None) -> bool:
        """Wait until every task handed over (of ``job_id``, or all) is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: (self._pending if job_id is None
                                                else self._pending_by_job.get(job_id, 0)) == 0, timeout)

    def failure(self, job_id: int) -> Optional[BaseException]:
        """The error of a failed task of ``job_id`` (taken: asked once)."""
        with self._lock:
            return self._failures.pop(job_id, None)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what was handed over, then end the thread."""
        if not self._started:
            return
        self.flush(timeout=timeout)
        self._queue.put(None)
        self._thread.join(timeout)
        self._started = False

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            self._run(task)

    def _run(self, task: Task) -> None:
        try:
            if task.job_id is not None:
                with job_context(task.job_id, task.stage):
                    task.run()
            else:
                task.run()
        except Exception as exc:  # noqa: BLE001 - remembered for the job; the writer goes on
            log.warning("%s failed: %s", task.what, exc, exc_info=not isinstance(exc, OSError))
            if task.job_id is not None:
                with self._lock:
                    self._failures.setdefault(task.job_id, exc)
        finally:
            with self._idle:
                self._pending -= 1
                left = self._pending_by_job.get(task.job_id, 1) - 1
                if left:
                    self._pending_by_job[task.job_id] = left
                else:
                    self._pending_by_job.pop(task.job_id, None)
                self._idle.notify_all()
