"""Notifications: delivering the outbox (``db/notifications.py``) from a thread beside the loop.

A notification row is written in the very transaction that marks a job done or failed or records
an alarm, so none is lost to a crash; this thread (``qie-notify``) delivers the due rows to their
targets and records each attempt, so none is lost to a restart either:

- the daemon's ``notify_urls`` (Apprise) and ``notify_webhook_url`` (a JSON POST signed with
  HMAC-SHA256), for the events in ``notify_on``;
- the Apprise URLs a job's preset (or job file) names in ``notify``, for its done and failed events.

Delivery is at least once: a target that accepted a notification is not sent it again, one that
failed is tried again after ``notify_retry_backoff`` seconds, doubling (at most an hour), up to
``notify_max_attempts`` attempts. A crash between a target accepting and the attempt being
recorded sends it again: every delivery carries the notification's idempotency key
(``Idempotency-Key`` header; in the webhook's body too), by which a receiver drops repeats.
Nothing here runs on the compute loop, and no database transaction is open while a target is
contacted. With several daemons on one PostgreSQL database one of them delivers at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional
from urllib.parse import urlsplit

from config import Settings
from db import Database, jobs, notifications, utcnow
from db.schema import Notification
from processor.alarms import DiskSpaceWatch

log = logging.getLogger(__name__)

MAX_BACKOFF = 3600.0
KEEP_DELIVERED = timedelta(days=30)
APPRISE_HEADER_SCHEMES = {"json", "jsons", "form", "forms", "xml", "xmls"}  # Apprise sends `+Name=value` as headers


class DeliveryError(Exception):
    """A target did not accept a notification; the message says why."""


@dataclass(frozen=True)
class Target:
    kind: str  # "apprise" or "webhook"
    url: str

    @property
    def id(self) -> str:
        """Stable and not secret: recorded once the target accepted a notification."""
        return hashlib.sha256(f"{self.kind} {self.url}".encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The URL without what may be secret in it (user, password, path, query)."""
        parts = urlsplit(self.url)
        return f"{self.kind} {parts.scheme}://{parts.hostname or ''}"


def targets_for(settings: Settings, notification: Notification, job_urls: list[str]) -> list[Target]:
    """Where a notification goes: the daemon's targets when its event is in ``notify_on``, and the
    job's own (its preset's) Apprise URLs for its done and failed events."""
    found: list[Target] = []
    if notification.event in settings.notify_on:
        found += [Target("apprise", url) for url in settings.notify_urls]
        if settings.notify_webhook_url:
            found.append(Target("webhook", settings.notify_webhook_url))
    if settings.notify_job_urls and notification.event in ("done", "failed"):
        found += [Target("apprise", url) for url in job_urls]
    unique = {target.id: target for target in found}
    return list(unique.values())


def webhook_body(notification: Notification) -> bytes:
    document = {"key": notification.key, "event": notification.event, "title": notification.title,
                "message": notification.message, "created_at": notification.created_at.isoformat() + "Z",
                **notification.payload}
    return json.dumps(document, sort_keys=True).encode()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``X-Qie-Signature``: ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def send_webhook(settings: Settings, notification: Notification, timeout: float = 10.0) -> None:
    import httpx

    body = webhook_body(notification)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "qie-hotfolder",
               "Idempotency-Key": notification.key, "X-Qie-Event": notification.event,
               "X-Qie-Timestamp": timestamp,
               "X-Qie-Signature": sign(settings.notify_webhook_secret or "", timestamp, body)}
    try:
        response = httpx.post(settings.notify_webhook_url or "", content=body, headers=headers, timeout=timeout,
                              follow_redirects=False)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"HTTP {response.status_code}")


def send_apprise(url: str, notification: Notification) -> None:
    import apprise

    if urlsplit(url).scheme.lower() in APPRISE_HEADER_SCHEMES:
        url += ("&" if "?" in url else "?") + f"+Idempotency-Key={notification.key}"
    kind = apprise.NotifyType.SUCCESS if notification.event == "done" else apprise.NotifyType.FAILURE
    with apprise.LogCapture(level=logging.WARNING) as captured:
        sender = apprise.Apprise()
        if not sender.add(url):
            raise DeliveryError("not a URL Apprise knows")
        if not sender.notify(title=notification.title, body=notification.message, notify_type=kind):
            detail = " ".join(captured.getvalue().split())[-300:]
            raise DeliveryError(f"not delivered{': ' + detail if detail else ''}")


class NotificationSender:
    """The ``qie-notify`` thread: delivers due notifications, checks free disk space."""

    def __init__(self, settings: Settings, db: Database, interval: float = 1.0):
        self.settings = settings
        self.db = db
        self.interval = interval
        self.disk = DiskSpaceWatch(settings, db)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._next_prune = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qie-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.db.exclusive("notify") as mine:
                    if mine:
                        self.disk.check_when_due(time.monotonic())
                        self.deliver_due()
                        self._prune_when_due(time.monotonic())
            except Exception:  # noqa: BLE001 - the thread's edge: the database may be back next time
                log.exception("notifications: unexpected error; trying again shortly")
            self._stop.wait(self.interval)

    def deliver_due(self) -> int:
        """Try every notification that is due; how many were tried."""
        with self.db.begin() as session:
            due = notifications.due(session, utcnow())
            job_urls = {n.id: _job_urls(session, n.job_id) for n in due}
        for notification in due:
            if self._stop.is_set():
                break
            self.deliver(notification, job_urls[notification.id])
        return len(due)

    def deliver(self, notification: Notification, job_urls: list[str]) -> None:
        delivered = list(notification.delivered_to or [])
        errors = []
        for target in targets_for(self.settings, notification, job_urls):
            if target.id in delivered:
                continue
            try:
                if target.kind == "webhook":
                    send_webhook(self.settings, notification)
                else:
                    send_apprise(target.url, notification)
            except DeliveryError as exc:
                errors.append(f"{target.name}: {exc}")
                continue
            delivered.append(target.id)
        attempts = notification.attempts + 1
        retry_at = None
        if errors and attempts < self.settings.notify_max_attempts:
            delay = min(self.settings.notify_retry_backoff * 2 ** (attempts - 1), MAX_BACKOFF)
            retry_at = utcnow() + timedelta(seconds=delay)
        error = "; ".join(errors) or None
        with self.db.begin() as session:
            notifications.record_attempt(session, notification.id, delivered, not errors, error, retry_at)
        if errors and retry_at is None:
            log.error("notification %s (%s) given up after %d attempts: %s", notification.key, notification.title,
                      attempts, error)
        elif errors:
            log.warning("notification %s (%s) not delivered (attempt %d): %s; trying again at %s UTC",
                        notification.key, notification.title, attempts, error, f"{retry_at:%H:%M:%S}")

    def _prune_when_due(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + 3600
        with self.db.begin() as session:
            notifications.prune(session, KEEP_DELIVERED)


def _job_urls(session, job_id: Optional[int]) -> list[str]:
    if job_id is None:
        return []
    job = jobs.get_job(session, job_id)
    urls = job.spec.job_file.get("notify") if job is not None else None
    return [u for u in urls if isinstance(u, str)] if isinstance(urls, list) else []
