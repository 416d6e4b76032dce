"""The HTML pages: queue and history, a job, failures, upload, the daemons, login.

Plain server-rendered HTML with one stylesheet and one small script for live updates; every
action is a form that works without the script. Every value shown is escaped (Jinja's
autoescape): job names, prompts and errors come from files people drop.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from typing import Any, Optional
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from db import notifications, utcnow, views
from processor.submit import preset_names
from web.api import daemons_report, detail, job_list, parse_states, receive_upload, transition
from web.context import WebContext, context_of
from web.present import ACTIVE, STATES, iso, plain_error
from web.security import SESSION_COOKIE, check_csrf, local_path, same, session_value

router = APIRouter(include_in_schema=False)
PER_PAGE = 50


def page(ctx: WebContext, request: Request, template: str, status: int = 200, banner: bool = True,
         **values: Any) -> HTMLResponse:
    html = ctx.render(template, request, banner=banner_html(ctx) if banner else "", **values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def banner_html(ctx: WebContext) -> str:
    report = daemons_report(ctx)
    with ctx.db.begin() as session:
        failed = views.job_count(session, ["failed"])
    return ctx.render("_banner.html", alarms=report["active_alarms"], daemons=report["daemons"], failed=failed)


# Queue and history ---------------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def queue_page(request: Request, state: Optional[str] = None, preset: Optional[str] = None,
               page_number: int = Query(1, alias="page", ge=1)) -> HTMLResponse:
    ctx = context_of(request)
    listing = job_list(ctx, parse_states(state), preset or None, page_number, PER_PAGE)
    with ctx.db.begin() as session:
        presets = views.presets(session)
    query = {k: v for k, v in (("state", state), ("preset", preset)) if v}
    return page(ctx, request, "queue.html", title="Queue", listing=listing, states=STATES, state=state or "",
                preset=preset or "", presets=presets, query=query, urlencode=urlencode,
                events=f"/events?{urlencode({**query, 'page': page_number})}")


@router.get("/failed", response_class=HTMLResponse)
def failed_page(request: Request, page_number: int = Query(1, alias="page", ge=1)) -> HTMLResponse:
    ctx = context_of(request)
    listing = job_list(ctx, ["failed"], None, page_number, PER_PAGE)
    retrying = [j for j in job_list(ctx, ["queued"], None, 1, 200)["jobs"] if j["error"]]
    return page(ctx, request, "failed.html", title="Failed", listing=listing, retrying=retrying,
                events="/events?state=failed")


# A job -----------------------------------------------------------------------------------------------

def live_html(ctx: WebContext, job_id: int) -> str:
    """The part of a job's page that changes while it runs."""
    found = detail(ctx, job_id)
    return ctx.render("_job_live.html", d=found, j=found["summary"], thumbs=thumbs_of(found))


def thumbs_of(found: dict[str, Any]) -> list[str]:
    images = [i["key"] for i in found["inputs"] if i.get("key")]
    return sorted(images)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int) -> HTMLResponse:
    ctx = context_of(request)
    found = detail(ctx, job_id)
    return page(ctx, request, "job.html", title=f"Job {job_id}", d=found, j=found["summary"],
                thumbs=thumbs_of(found), events=f"/events?job={job_id}", plain_error=plain_error)


@router.post("/jobs/{job_id}/{action}")
def job_action(request: Request, job_id: int, action: str, csrf: str = Form(""),
               next_page: str = Form("", alias="next")) -> RedirectResponse:
    if action not in ("retry", "cancel"):
        raise HTTPException(404, f"no action {action!r}")
    if not check_csrf(request.state, csrf):
        raise HTTPException(403, "the CSRF token is missing or wrong (reload the page)")
    transition(context_of(request), job_id, action)
    return RedirectResponse(local_path(next_page, f"/jobs/{job_id}"), status_code=303)


# Upload ------------------------------------------------------------------------------------------------

@router.get("/upload", response_class=HTMLResponse)
def upload_page(request: Request, placed: Optional[str] = None) -> HTMLResponse:
    ctx = context_of(request)
    return page(ctx, request, "upload.html", title="Upload", presets=preset_names(ctx.settings.inbox),
                placed=[p for p in (placed or "").split("\n") if p], error=None,
                limit=ctx.settings.max_upload_bytes)


@router.post("/upload", response_class=HTMLResponse)
async def upload_form(request: Request) -> Response:
    ctx = context_of(request)
    try:
        placed = await receive_upload(request)
    except HTTPException as exc:
        return page(ctx, request, "upload.html", status=exc.status_code, title="Upload",
                    presets=preset_names(ctx.settings.inbox), placed=[], error=exc.detail,
                    limit=ctx.settings.max_upload_bytes)
    return RedirectResponse("/upload?" + urlencode({"placed": "\n".join(placed)}), status_code=303)


# The daemons ------------------------------------------------------------------------------------------

@router.get("/daemons", response_class=HTMLResponse)
def daemons_page(request: Request) -> HTMLResponse:
    ctx = context_of(request)
    report = daemons_report(ctx)
    disks = []
    for name, folder in ctx.settings.folders().items():
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            disks.append({"name": name, "path": str(folder), "free": None, "total": None})
            continue
        disks.append({"name": name, "path": str(folder), "free": usage.free, "total": usage.total})
    with ctx.db.begin() as session:
        counts = notifications.counts(session)
        problems = [{"key": n.key, "title": n.title, "state": n.state, "attempts": n.attempts,
                     "error": n.last_error, "at": iso(n.created_at)} for n in notifications.recent_problems(session)]
        day = views.recent_alarms(session, utcnow() - timedelta(days=7), limit=50)
        alarms = [{"at": iso(e.at), "level": e.level, "message": e.message} for e in day]
    return page(ctx, request, "daemons.html", title="Daemons", report=report, disks=disks, alarms=alarms,
                notes=counts, problems=problems, settings=ctx.settings, active=ACTIVE)


# Login ----------------------------------------------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next_page: str = Query("/", alias="next")) -> HTMLResponse:
    ctx = context_of(request)
    return page(ctx, request, "login.html", banner=False, title="Log in", next=local_path(next_page), error=None)


@router.post("/login")
def login(request: Request, token: str = Form(""), csrf: str = Form(""),
          next_page: str = Form("/", alias="next")) -> Response:
    ctx = context_of(request)
    if ctx.token is None:
        return RedirectResponse(local_path(next_page), status_code=303)
    if not check_csrf(request.state, csrf) or not same(token.strip(), ctx.token):
        return page(ctx, request, "login.html", status=401, banner=False, title="Log in", next=local_path(next_page),
                    error="That is not the token.")
    response = RedirectResponse(local_path(next_page), status_code=303)
    response.set_cookie(SESSION_COOKIE, session_value(ctx.token), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=30 * 86400)
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    if not check_csrf(request.state, csrf):
        raise HTTPException(403, "the CSRF token is missing or wrong (reload the page)")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
