"""Fault points: named places where a test can make the real daemon die, or pause.

``QIE_FAULTS`` holds comma-separated entries ``point[@N][=action]``: act the N-th time the point
is reached (counting from 1; default the first). Actions:

- ``kill`` (the default): SIGKILL to the process itself, which is exactly what a power cut or
  the OOM killer does;
- ``pause:SECONDS``: sleep there, e.g. ``stage.sample.step2=pause:5``, so that a test can send
  a signal while the daemon is at a known place (a graceful stop mid-sampling).

Test-only: without the variable this is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()


def _plan() -> dict[str, tuple[int, str]]:
    plan = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("QIE_FAULTS", "").split(","))):
        where, _, action = entry.partition("=")
        point, _, count = where.partition("@")
        plan[point] = (int(count or 1), action or "kill")
    return plan


def fault_point(point: str) -> None:
    """Die (or pause) here if the test asked for it."""
    if "QIE_FAULTS" not in os.environ:
        return
    _reached[point] += 1
    wanted = _plan().get(point)
    if wanted is None or _reached[point] != wanted[0]:
        return
    action = wanted[1]
    if action.startswith("pause:"):
        # A plain sleep on purpose: signals arriving meanwhile only set the daemon's flags.
        time.sleep(float(action.split(":", 1)[1]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
