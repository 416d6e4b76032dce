"""The web application: pages, JSON API, live updates, metrics, behind the security guard."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from config import Settings
from db import Database
from web.api import router as api_router
from web.metrics import registry_for, router as metrics_router
from web.pages import router as pages_router
from web.sse import ChangeFeed, router as sse_router
from web.context import STATIC, WebContext
from web.security import Guard, is_loopback, parse_listen, send_body

UPLOAD_OVERHEAD = 1 << 20  # multipart boundaries and fields around the files


class TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` gets 413, whether its length was
    announced (refused before reading) or not (refused when it grows past it)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _too_large(send, self.limit)
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise TooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooLarge:
            if not started:
                await _too_large(send, self.limit)


async def _too_large(send: Any, limit: int) -> None:
    body = f'{{"detail": "the upload is larger than max_upload_bytes ({limit - UPLOAD_OVERHEAD} bytes)"}}'.encode()
    await send_body(send, 413, body, b"application/json", [(b"connection", b"close")])


def create_app(settings: Settings, token: Optional[str], db: Optional[Database] = None, daemon: Any = None) -> FastAPI:
    """The application for ``settings``; ``token`` as ``web.security.required_token`` gives it."""
    host, port = parse_listen(settings.http_listen if settings.http_listen != "off" else "127.0.0.1:8765")
    app = FastAPI(title="qie-hotfolder", version="1", docs_url=None, redoc_url=None,
                  description="The daemon's queue over HTTP: the same operations as the command line. "
                              "See docs/web.md.")
    ctx = WebContext(settings=settings, db=db or Database(settings.url, create=False), token=token,
                     listen=settings.http_listen, daemon=daemon)
    ctx.feed = ChangeFeed(ctx)
    app.state.ctx = ctx
    app.state.registry = registry_for(ctx)
    for router in (api_router, sse_router, metrics_router, pages_router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + UPLOAD_OVERHEAD)
    app.add_middleware(Guard, token=token, loopback=is_loopback(host), port=port)
    return app
