"""Live updates by server-sent events: one change feed per web server, many listeners.

The feed is a thread that, while anyone listens, reads every half second which jobs changed
(``jobs.updated_at``, by its index; the heartbeat stores progress at most twice a second) and
what the daemons' status files say, and hands the changes to every listener. It reads the
database and the work folder only: nothing is added to the compute loop, which does not know
it exists. A listener that falls behind is told to reload instead of holding memory.

``/events`` (the pages) sends rendered table rows, the job page's live part and the alarm banner;
``/api/events`` sends the same changes as JSON job summaries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Query, Request
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from db import utcnow, views
from web.context import WebContext, context_of
from web.present import summary

log = logging.getLogger(__name__)
router = APIRouter()

OVERLAP = timedelta(seconds=5)  # changes stamped by another machine's slightly late clock are still seen
QUEUE_SIZE = 200


@dataclass(eq=False)
class Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    behind: bool = False

    def offer(self, item: Optional[dict]) -> None:
        """Called in the loop's thread."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.behind = True


class ChangeFeed:
    def __init__(self, ctx: WebContext, interval: float = 0.5, banner_interval: float = 2.0):
        self.ctx = ctx
        self.interval = interval
        self.banner_interval = banner_interval
        self._listeners: set[Listener] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._cursor: Optional[datetime] = None
        self._seen: dict[int, datetime] = {}
        self._banner: Optional[str] = None
        self.polls = 0

    def subscribe(self) -> Listener:
        listener = Listener(asyncio.get_running_loop())
        with self._lock:
            self._listeners.add(listener)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="qie-web-feed", daemon=True)
                self._thread.start()
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self._closed = True
        self._wake.set()
        self._broadcast(None)

    def _run(self) -> None:
        next_banner = 0.0
        clock = 0.0
        while not self._closed:
            with self._lock:
                if not self._listeners:
                    self._thread = None
                    return
            try:
                self.poll()
                if clock >= next_banner:
                    next_banner = clock + self.banner_interval
                    self.poll_banner()
            except Exception:  # noqa: BLE001 - the database may be busy or away for a moment
                log.warning("live updates: reading the queue failed; trying again", exc_info=True)
            self._wake.wait(self.interval)
            clock += self.interval

    def poll(self) -> None:
        """Read the jobs changed since the last look; send them to every listener."""
        self.polls += 1
        with self.ctx.db.begin() as session:
            if self._cursor is None:
                self._cursor = views.newest_change(session) or utcnow()
                return
            changes = views.changed_since(session, self._cursor - OVERLAP)
            fresh = [(job_id, at) for job_id, at in changes if self._seen.get(job_id) != at]
            rows = views.list_rows(session, [job_id for job_id, _ in fresh]) if fresh else []
        if changes:
            self._cursor = max(self._cursor, changes[-1][1])
        for job_id, at in fresh:
            self._seen[job_id] = at
        horizon = self._cursor - OVERLAP * 2
        self._seen = {job_id: at for job_id, at in self._seen.items() if at >= horizon}
        if not rows:
            return
        times = self.ctx.times.get()
        now = utcnow()
        items = []
        for row in sorted(rows, key=lambda r: r.id):
            job = summary(row, times, now)
            items.append({"job": job, "row_html": self.ctx.render("_row.html", j=job)})
        self._broadcast({"type": "jobs", "items": items})

    def poll_banner(self) -> None:
        from web.pages import banner_html
        html = banner_html(self.ctx)
        if html != self._banner:
            first = self._banner is None
            self._banner = html
            if not first:
                self._broadcast({"type": "banner", "html": html})

    def _broadcast(self, item: Optional[dict]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.loop.call_soon_threadsafe(listener.offer, item)
            except RuntimeError:  # its loop is closed
                self.unsubscribe(listener)


def _matches(job: dict[str, Any], states: Optional[list[str]], preset: Optional[str]) -> bool:
    return (not states or job["state"] in states) and (not preset or job["preset"] == preset)


async def _stream(request: Request, html: bool, states: Optional[list[str]], preset: Optional[str],
                  job_id: Optional[int], insert: bool) -> AsyncIterator[dict[str, str]]:
    ctx = context_of(request)
    listener = ctx.feed.subscribe()
    try:
        yield {"event": "hello", "data": "{}"}
        while True:
            item = await listener.queue.get()
            if item is None:
                return
            if listener.behind:
                yield {"event": "reload", "data": "{}"}
                return
            if item["type"] == "banner":
                if html:
                    yield {"event": "banner", "data": json.dumps({"html": item["html"]})}
                continue
            for entry in item["items"]:
                job = entry["job"]
                if job_id is not None:
                    if job["id"] != job_id:
                        continue
                    if html:
                        from web.pages import live_html
                        fragment = await run_in_threadpool(live_html, ctx, job_id)
                        yield {"event": "job", "data": json.dumps({"id": job_id, "html": fragment})}
                    else:
                        yield {"event": "job", "data": json.dumps(job)}
                    continue
                match = _matches(job, states, preset)
                if not html:
                    if match:
                        yield {"event": "job", "data": json.dumps(job)}
                    continue
                yield {"event": "row", "data": json.dumps({"id": job["id"], "html": entry["row_html"] if match else None,
                                                           "insert": insert})}
    finally:
        ctx.feed.unsubscribe(listener)


@router.get("/events", include_in_schema=False)
async def page_events(request: Request, state: Optional[str] = None, preset: Optional[str] = None,
                      job: Optional[int] = None, page: int = Query(1, ge=1)) -> EventSourceResponse:
    from web.api import parse_states
    return EventSourceResponse(_stream(request, True, parse_states(state), preset, job, page == 1), ping=15)


@router.get("/api/events", tags=["jobs"],
            summary="Server-sent events: `job` (a job summary) whenever a job changes")
async def api_events(request: Request, state: Optional[str] = None, preset: Optional[str] = None,
                     job: Optional[int] = None) -> EventSourceResponse:
    from web.api import parse_states
    return EventSourceResponse(_stream(request, False, parse_states(state), preset, job, True), ping=15)
