"""What every request handler of one web server shares: settings, database, token, templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request

from config import Settings
from db import Database, Job, jobs
from processor.report import daemon_status
from web.eta import CachedTimes
from web.present import duration_words
from web.thumbs import Thumbnails

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def make_templates() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True), auto_reload=False,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = duration_words
    env.filters["mb"] = lambda n: f"{(n or 0) / 1e6:,.0f} MB"
    env.filters["gb"] = lambda n: f"{(n or 0) / 1e9:,.2f} GB"
    return env


@dataclass
class WebContext:
    settings: Settings
    db: Database
    token: Optional[str]
    listen: str
    daemon: Any = None  # the Daemon serving these pages, None in ``run.py web``
    templates: Environment = field(default_factory=make_templates)
    times: CachedTimes = None  # type: ignore[assignment]
    thumbs: Thumbnails = None  # type: ignore[assignment]
    feed: Any = None  # web.sse.ChangeFeed

    def __post_init__(self) -> None:
        if self.times is None:
            self.times = CachedTimes(self.db)
        if self.thumbs is None:
            self.thumbs = Thumbnails(self.settings)

    def daemons(self) -> list[dict[str, Any]]:
        """What each daemon sharing the work folder last wrote to its status file."""
        return daemon_status(self.settings.work)

    @property
    def engine_created(self) -> bool:
        return self.daemon is not None and getattr(self.daemon, "_engine", None) is not None

    def job(self, job_id: int) -> Optional[Job]:
        with self.db.begin() as session:
            return jobs.get_job(session, job_id)

    def render(self, name: str, request: Optional[Request] = None, **values: Any) -> str:
        csrf = getattr(request.state, "csrf", "") if request is not None else ""
        return self.templates.get_template(name).render(csrf=csrf, login=self.token is not None, **values)


def context_of(request: Request) -> WebContext:
    return request.app.state.ctx
