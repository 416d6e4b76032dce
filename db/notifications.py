"""The notification outbox: rows written with the change they tell about, read by the sender.

``enqueue`` is called inside the transaction that marks a job done or failed, or records an
alarm (``db/jobs.py``), so a notification exists exactly when its event does: a crash either
loses both or keeps both. The sender (``processor/notify.py``) takes due rows, delivers them
outside any transaction, and records each attempt: the targets that accepted it, or when to try
again. A row is never deleted before it was delivered or given up on.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Optional

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import Notification, NotificationState, utcnow

EVENTS = ("done", "failed", "alarm")
_PENDING = NotificationState.PENDING.value


def enqueue(session: Session, event: str, title: str, message: str, job_id: Optional[int] = None,
            payload: Optional[dict[str, Any]] = None) -> None:
    """Add a notification to the outbox, in the caller's transaction. Its key (``qie-`` and 32
    hex digits) is what every delivery of it carries, so that a receiver can drop repeats."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    session.add(Notification(key=f"qie-{uuid.uuid4().hex}", event=event, job_id=job_id, title=title[:500],
                             message=message, payload=payload or {}, state=_PENDING, attempts=0,
                             delivered_to=[], created_at=utcnow()))


def due(session: Session, now: datetime, limit: int = 20) -> list[Notification]:
    """Pending notifications whose next attempt has come, oldest first."""
    stmt = (select(Notification)
            .where(Notification.state == _PENDING,
                   or_(Notification.next_attempt_at.is_(None), Notification.next_attempt_at <= now))
            .order_by(Notification.id).limit(limit))
    return list(session.scalars(stmt))


def next_due_at(session: Session) -> Optional[datetime]:
    """When the earliest pending notification is due (None: nothing pending)."""
    stmt = select(func.min(func.coalesce(Notification.next_attempt_at, Notification.created_at))).where(
        Notification.state == _PENDING)
    return session.scalar(stmt)


def record_attempt(session: Session, notification_id: int, delivered_to: list[str], complete: bool,
                   error: Optional[str], retry_at: Optional[datetime]) -> None:
    """One delivery attempt: the targets that accepted it so far; delivered when ``complete``,
    else retried at ``retry_at`` (None: given up)."""
    if complete:
        state, finished = NotificationState.DELIVERED.value, utcnow()
    elif retry_at is None:
        state, finished = NotificationState.GAVE_UP.value, utcnow()
    else:
        state, finished = _PENDING, None
    session.execute(update(Notification).where(Notification.id == notification_id).values(
        attempts=Notification.attempts + 1, delivered_to=delivered_to, state=state, finished_at=finished,
        next_attempt_at=retry_at, last_error=error[:2000] if error else None))


def counts(session: Session) -> dict[str, int]:
    """Notifications by state."""
    return {state: count for state, count in
            session.execute(select(Notification.state, func.count()).group_by(Notification.state))}


def recent_problems(session: Session, limit: int = 10) -> list[Notification]:
    """Notifications given up on, or pending after a failed attempt, newest first."""
    stmt = (select(Notification).where(Notification.last_error.is_not(None))
            .order_by(Notification.id.desc()).limit(limit))
    return list(session.scalars(stmt))


def prune(session: Session, older_than: timedelta) -> int:
    """Remove delivered notifications finished more than ``older_than`` ago; how many."""
    cutoff = utcnow() - older_than
    result = session.execute(delete(Notification).where(
        Notification.state == NotificationState.DELIVERED.value, Notification.finished_at < cutoff))
    return int(result.rowcount or 0)
