"""How long a running job has left: one function, from measured stage durations.

``remaining_seconds`` is the only thing the pages and the API ask; a better estimator can
replace it without touching them. This one takes the median of the latest computations of each
stage (``stage_runs.duration_s``; sampling per step) and adds up what the job has left: the rest
of its current stage and every stage after it. Stages a job will reuse from checkpoints are not
known in advance, so the estimate errs long for such a job.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from db import Database, views
from stages import STAGE_NAMES


@dataclass(frozen=True)
class StageTimes:
    """Median seconds of each stage (``sample``: per step) over its latest computations."""

    seconds: dict[str, float]

    @classmethod
    def from_samples(cls, samples: list[views.StageSample]) -> "StageTimes":
        found: dict[str, list[float]] = {}
        for sample in samples:
            found.setdefault(sample.stage, []).append(sample.seconds / sample.steps if sample.steps else sample.seconds)
        return cls({stage: statistics.median(values) for stage, values in found.items()})


def remaining_seconds(row: Any, times: StageTimes, steps_default: int = 4) -> Optional[float]:
    """Seconds a running job has left (None when unknown: not running, or nothing measured)."""
    if row.state != "running" or not row.stage or row.stage not in STAGE_NAMES:
        return None
    if not times.seconds:
        return None
    index = STAGE_NAMES.index(row.stage)
    left = 0.0
    for position, stage in enumerate(STAGE_NAMES[index:]):
        per = times.seconds.get(stage)
        if per is None:
            continue
        if stage == "sample":
            total = row.steps_total or steps_default
            done = (row.step or 0) if position == 0 else 0
            left += per * max(total - done, 0)
        else:
            left += per * (0.5 if position == 0 else 1.0)  # halfway through the current one, on average
    return left


class CachedTimes:
    """``StageTimes`` read from the database at most every ``ttl`` seconds."""

    def __init__(self, db: Database, ttl: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.db = db
        self.ttl = ttl
        self.clock = clock
        self._value = StageTimes({})
        self._at = -1e9
        self._lock = threading.Lock()

    def get(self) -> StageTimes:
        with self._lock:
            if self.clock() - self._at >= self.ttl:
                with self.db.begin() as session:
                    self._value = StageTimes.from_samples(views.recent_stage_samples(session))
                self._at = self.clock()
            return self._value
