"""The JSON API: the CLI's operations over HTTP (``status``, ``show``, ``retry``, ``cancel``,
``submit``), the files of a job by its id, and the health checks.

Changes go through ``db/jobs.py`` (retry, cancel) and ``processor/submit.py`` (uploads land in
the inbox as drops), exactly as the CLI's do; everything else only reads.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from db import jobs, utcnow, views
from processor import actions
from processor.health import daemon_health, readiness
from processor.report import job_detail
from processor.submit import UploadError, preset_names, submit_upload
from web.context import WebContext, context_of
from web.present import ACTIVE, STATES, iso, summary
from web.security import check_csrf
from web.thumbs import WHICH, manifest_file, output_file

router = APIRouter()
MAX_PER_PAGE = 200
UPLOAD_VALUES = {"steps": int, "seed": int, "megapixels": float, "output_format": str, "negative_prompt": str}


# Reading ------------------------------------------------------------------------------------------

def parse_states(state: Optional[str]) -> Optional[list[str]]:
    """``state`` as a list: one state, several comma-separated, ``active``, or None for all."""
    if not state or state == "all":
        return None
    found: list[str] = []
    for part in state.split(","):
        part = part.strip()
        if part == "active":
            found += ACTIVE
        elif part in STATES:
            found.append(part)
        else:
            raise HTTPException(400, f"state {part!r}: use one of {', '.join(STATES)}, active or all")
    return found


def job_list(ctx: WebContext, states: Optional[list[str]], preset: Optional[str], page: int,
             per_page: int) -> dict[str, Any]:
    times = ctx.times.get()
    now = utcnow()
    with ctx.db.begin() as session:
        total = views.job_count(session, states, preset)
        rows = views.job_page(session, states, preset, per_page, (page - 1) * per_page)
    return {"jobs": [summary(row, times, now) for row in rows], "total": total, "page": page,
            "per_page": per_page, "pages": max(math.ceil(total / per_page), 1)}


@router.get("/api/jobs", tags=["jobs"], summary="Jobs, newest first (like `run.py status --json`)")
def api_jobs(request: Request, state: Optional[str] = Query(None, description="a state, several comma-separated, `active` or `all`"),
             preset: Optional[str] = None, page: int = Query(1, ge=1),
             per_page: int = Query(50, ge=1, le=MAX_PER_PAGE)) -> dict[str, Any]:
    return job_list(context_of(request), parse_states(state), preset, page, per_page)


def detail(ctx: WebContext, job_id: int) -> dict[str, Any]:
    found = job_detail(ctx.db, job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    with ctx.db.begin() as session:
        row = views.list_rows(session, [job_id])[0]
    found["summary"] = summary(row, ctx.times.get())
    return found


@router.get("/api/jobs/{job_id}", tags=["jobs"], summary="One job: parameters, stages, events (like `run.py show --json`)")
def api_job(request: Request, job_id: int) -> dict[str, Any]:
    return detail(context_of(request), job_id)


@router.get("/api/presets", tags=["jobs"], summary="The preset folders of the inbox")
def api_presets(request: Request) -> dict[str, list[str]]:
    return {"presets": preset_names(context_of(request).settings.inbox)}


def daemons_report(ctx: WebContext) -> dict[str, Any]:
    now = utcnow()
    daemons = []
    for status in ctx.daemons():
        healthy, reason = daemon_health(status, now)
        daemons.append({**status, "healthy": healthy, "health": reason})
    with ctx.db.begin() as session:
        alarms = [{"at": iso(e.at), "level": e.level, "message": e.message}
                  for e in views.recent_alarms(session, now - timedelta(days=1))]
    return {"daemons": daemons, "alarms": alarms, "active_alarms": active_alarms(alarms)}


def active_alarms(alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alarms (newest first) not followed by an all-clear about the same thing."""
    cleared: set[str] = set()
    active = []
    for alarm in alarms:
        subject = alarm_subject(alarm["message"])
        if alarm["level"] != "error":
            cleared.add(subject)
        elif subject not in cleared:
            active.append(alarm)
            cleared.add(subject)
    return active


def alarm_subject(message: str) -> str:
    for marker in (" is missing", " is back", " is not usable", " is usable again", " is nearly full",
                   " has ", " free again"):
        if marker in message:
            return message.split(marker, 1)[0]
    return message


@router.get("/api/daemons", tags=["daemons"], summary="The daemons sharing this work folder, and alarms")
def api_daemons(request: Request) -> dict[str, Any]:
    return daemons_report(context_of(request))


# Files, by job id ----------------------------------------------------------------------------------

def _job_or_404(ctx: WebContext, job_id: int):
    job = ctx.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def _outbox_file(request: Request, job_id: int, find: Any, what: str) -> Path:
    ctx = context_of(request)
    path = find(ctx.settings, _job_or_404(ctx, job_id))
    if path is None:
        raise HTTPException(404, f"job {job_id} has no {what} in the outbox")
    return path


@router.get("/api/jobs/{job_id}/output", tags=["files"], summary="The published image")
def api_output(request: Request, job_id: int) -> FileResponse:
    path = _outbox_file(request, job_id, output_file, "output")
    return FileResponse(path, filename=path.name)


@router.get("/api/jobs/{job_id}/manifest", tags=["files"], summary="The published manifest (download)")
def api_manifest(request: Request, job_id: int) -> FileResponse:
    path = _outbox_file(request, job_id, manifest_file, "manifest")
    return FileResponse(path, filename=path.name, media_type="application/json",
                        content_disposition_type="attachment")


@router.get("/api/jobs/{job_id}/thumbs/{which}", tags=["files"], summary="A thumbnail: output, image1, image2 or image3")
def api_thumb(request: Request, job_id: int, which: str) -> FileResponse:
    ctx = context_of(request)
    if which not in WHICH:
        raise HTTPException(404, f"no thumbnail {which!r}: use one of {', '.join(WHICH)}")
    path = ctx.thumbs.get(_job_or_404(ctx, job_id), which)
    if path is None:
        raise HTTPException(404, f"job {job_id} has no {which} to show")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# Changes ------------------------------------------------------------------------------------------

def transition(ctx: WebContext, job_id: int, action: str) -> dict[str, Any]:
    """``retry`` or ``cancel`` a job as the command line does (``processor/actions.py``: the state
    change through ``db/jobs.py``, a retried job's stale report out of failed/); its summary after."""
    try:
        getattr(actions, action)(ctx.settings, ctx.db, job_id)
    except jobs.TransitionError as exc:
        raise HTTPException(404 if str(exc) == f"no job {job_id}" else 409, str(exc)) from exc
    with ctx.db.begin() as session:
        return summary(views.list_rows(session, [job_id])[0], ctx.times.get())


def _csrf_or_403(request: Request, given: Optional[str]) -> None:
    if not check_csrf(request.state, given or request.headers.get("x-csrf-token")):
        raise HTTPException(403, "the CSRF token is missing or wrong (reload the page)")


@router.post("/api/jobs/{job_id}/retry", tags=["jobs"], summary="Queue a failed or cancelled job again")
def api_retry(request: Request, job_id: int) -> dict[str, Any]:
    _csrf_or_403(request, None)
    return transition(context_of(request), job_id, "retry")


@router.post("/api/jobs/{job_id}/cancel", tags=["jobs"], summary="Cancel a queued job, or stop a running one at its next step")
def api_cancel(request: Request, job_id: int) -> dict[str, Any]:
    _csrf_or_403(request, None)
    return transition(context_of(request), job_id, "cancel")


async def receive_upload(request: Request) -> list[str]:
    """Parse a multipart upload and place it in the inbox (``processor.submit.submit_upload``);
    the placed paths relative to the inbox. Raises HTTPException 4xx with the reason."""
    ctx = context_of(request)
    try:
        form = await request.form(max_files=200, max_fields=50)
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed upload: {exc.message}") from exc
    _csrf_or_403(request, _text(form.get("csrf")))
    photos = [item for item in form.getlist("photos") if isinstance(item, UploadFile) and item.filename]
    job_upload = form.get("job")
    job_file = (await job_upload.read()) if isinstance(job_upload, UploadFile) else (
        job_upload.encode() if isinstance(job_upload, str) and job_upload.strip() else None)
    mode = _text(form.get("mode"))
    preset = _text(form.get("preset")) or None
    prompt = _text(form.get("prompt")) or None
    if mode == "preset":
        prompt = None
    elif mode == "prompt":
        preset = None
    values = {}
    for key, kind in UPLOAD_VALUES.items():
        raw = _text(form.get(key)).strip()
        if raw:
            try:
                values[key] = kind(raw)
            except ValueError:
                raise HTTPException(400, f"field {key!r}: {raw!r} is not a {kind.__name__}") from None
    if values and prompt is None:
        raise HTTPException(400, "parameters go with a prompt (a preset or job file has its own)")
    try:
        placed = await run_in_threadpool(
            submit_upload, ctx.settings, [(p.filename, p.file) for p in photos], preset=preset, prompt=prompt,
            values=values, job_file=job_file, limit=ctx.settings.max_upload_bytes)
    except UploadError as exc:
        raise HTTPException(413 if "max_upload_bytes" in str(exc) else 400, str(exc)) from exc
    finally:
        await form.close()
    return [path.relative_to(ctx.settings.inbox).as_posix() for path in placed]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


@router.post("/api/jobs", tags=["jobs"], status_code=201,
             summary="Submit photos (multipart: `photos`, and `preset`, or `prompt` with optional `steps`, "
                     "`seed`, `megapixels`, `output_format`, `negative_prompt`, or a `job` file)")
async def api_submit(request: Request) -> dict[str, Any]:
    placed = await receive_upload(request)
    return {"placed": placed, "note": "placed in the inbox; each becomes a job once ingested"}


# Health -------------------------------------------------------------------------------------------

@router.get("/healthz", tags=["health"], summary="Whether the compute loop ticks")
def healthz(request: Request) -> JSONResponse:
    ctx = context_of(request)
    report = daemons_report(ctx)["daemons"]
    if ctx.daemon is not None:
        report = [d for d in report if d.get("worker") == ctx.daemon.worker] or report
    ok = bool(report) and all(d["healthy"] for d in report)
    body = {"ok": ok, "daemons": {d.get("worker", "?"): d["health"] for d in report}}
    if not report:
        body["reason"] = "no daemon has written a status file in the work folder"
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/readyz", tags=["health"], summary="Whether the engine and the inbox are usable")
def readyz(request: Request) -> JSONResponse:
    ctx = context_of(request)
    ok, checks = readiness(ctx.settings, ctx.engine_created)
    try:
        with ctx.db.begin() as session:
            views.newest_change(session)
        checks["database"] = "reachable"
    except Exception as exc:  # noqa: BLE001 - any database error means not ready
        ok = False
        checks["database"] = f"not reachable: {type(exc).__name__}"
    return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)
