"""How a job is shown: the summary the list pages, the live updates and ``/api/jobs`` share,
ages and durations in words, and errors in plain words."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from db import utcnow
from web.eta import StageTimes, remaining_seconds

STATES = ("waiting", "queued", "running", "done", "failed", "cancelled")
ACTIVE = ("waiting", "queued", "running")
RETRYABLE = ("failed", "cancelled")
CANCELLABLE = ("waiting", "queued", "running")

ERROR_KINDS = {
    "permanent": "This job cannot succeed as it is (a bad input, a missing model or a wrong setting). "
                 "Fix what the message names, then retry it.",
    "transient": "A temporary problem (out of memory, a full disk, a device error) kept coming back. "
                 "Retry it once the cause is gone.",
    "crash": "The daemon stopped while working on this job several times, so it was set aside to keep "
             "the queue moving. It may need more memory than this machine has.",
}


def iso(value: Optional[datetime]) -> Optional[str]:
    return value.isoformat(timespec="seconds") + "Z" if value is not None else None


def duration_words(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def plain_error(kind: Optional[str], error: Optional[str], state: str) -> str:
    """What went wrong, for a person: the kind explained, then the message itself."""
    if state == "cancelled":
        return "Cancelled on request."
    if not error:
        return ""
    explained = ERROR_KINDS.get(kind or "")
    if state == "queued" and kind == "transient":
        return f"A temporary problem; it will be tried again. {error}"
    return f"{explained} The error was: {error}" if explained else error


def summary(row: Any, times: StageTimes, now: Optional[datetime] = None) -> dict[str, Any]:
    """A job as lists show it (``row``: a ``db.views.LIST_COLUMNS`` row or a Job)."""
    now = now or utcnow()
    eta = remaining_seconds(row, times)
    progress = None
    if row.state == "running" and row.steps_total:
        progress = min(max((row.step or 0) / row.steps_total, 0.0), 1.0)
    return {
        "id": row.id, "name": row.name, "state": row.state, "stage": row.stage, "step": row.step,
        "steps_total": row.steps_total, "progress": progress, "eta_seconds": None if eta is None else round(eta, 1),
        "preset": row.preset, "priority": row.priority, "attempts": row.attempts,
        "error": row.error, "error_kind": row.error_kind,
        "error_text": plain_error(row.error_kind, row.error, row.state),
        "next_attempt_at": iso(row.next_attempt_at), "cancel_requested": bool(row.cancel_requested),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at), "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "age_seconds": round((now - row.created_at).total_seconds(), 1),
        "can_retry": row.state in RETRYABLE, "can_cancel": row.state in CANCELLABLE and not row.cancel_requested,
        "links": {"self": f"/api/jobs/{row.id}", "page": f"/jobs/{row.id}",
                  **({"output": f"/api/jobs/{row.id}/output", "thumbnail": f"/api/jobs/{row.id}/thumbs/output",
                      "manifest": f"/api/jobs/{row.id}/manifest"} if row.state == "done" else {})},
    }
