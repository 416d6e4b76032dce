"""Fault points: named places where a test can make the real daemon die, or pause.

``QIE_FAULTS`` holds comma-separated entries ``point[@WHEN][=action]``: act when the point is
reached for the N-th time (counting from 1). WHEN is ``N`` (default 1), ``N-M`` (the N-th to
the M-th time) or ``N+`` (the N-th time and every later one). Actions:

- ``kill`` (the default): SIGKILL to the process itself, which is exactly what a power cut or
  the OOM killer does;
- ``pause:SECONDS``: sleep there, e.g. ``stage.sample.step2=pause:5``, so that a test can send
  a signal while the daemon is at a known place (a graceful stop mid-sampling);
- ``enospc``, ``eio``: raise ``OSError`` (disk full, I/O error) there, e.g.
  ``checkpoint.write@1-2=enospc`` fails the first two checkpoint writes.

Test-only: without the variable this is a no-op.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()


def _plan() -> dict[str, tuple[int, float, str]]:
    """point -> (first, last, action) for the times the point is reached."""
    plan = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("QIE_FAULTS", "").split(","))):
        where, _, action = entry.partition("=")
        point, _, when = where.partition("@")
        when = when or "1"
        if when.endswith("+"):
            first, last = int(when[:-1]), float("inf")
        elif "-" in when:
            first, last = (int(part) for part in when.split("-", 1))
        else:
            first = last = int(when)
        plan[point] = (first, last, action or "kill")
    return plan


def fault_point(point: str) -> None:
    """Die (or pause) here if the test asked for it."""
    if "QIE_FAULTS" not in os.environ:
        return
    _reached[point] += 1
    wanted = _plan().get(point)
    if wanted is None or not wanted[0] <= _reached[point] <= wanted[1]:
        return
    action = wanted[2]
    if action in ("enospc", "eio"):
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (injected at {point})")
    if action.startswith("pause:"):
        # A plain sleep on purpose: signals arriving meanwhile only set the daemon's flags.
        time.sleep(float(action.split(":", 1)[1]))
        return
    os.kill(os.getpid(), signal.SIGKILL)
