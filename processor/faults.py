"""Fault points: named places where a test can make the real daemon die.

``QIE_FAULTS`` holds comma-separated ``point`` or ``point@N`` entries (die the N-th time the
point is reached, counting from 1). Reaching a listed point sends SIGKILL to the process itself,
which is exactly what a power cut or the OOM killer does. Without the variable this is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def _plan() -> dict[str, int]:
    plan = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("QIE_FAULTS", "").split(","))):
        point, _, count = entry.partition("@")
        plan[point] = int(count or 1)
    return plan


def fault_point(point: str) -> None:
    """Die here if the test asked for it."""
    if "QIE_FAULTS" not in os.environ:
        return
    _reached[point] += 1
    wanted = _plan().get(point)
    if wanted is not None and _reached[point] == wanted:
        os.kill(os.getpid(), signal.SIGKILL)
