"""Running the web application: in a thread beside the daemon's compute loop, or alone
(``run.py web``) against the same database and folders.

The listening socket is bound before the thread starts, so a port in use is reported at once.
In the daemon a web server that cannot bind is logged and left out (processing goes on); a
missing token on a non-loopback address stops the daemon before it starts.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Optional

import uvicorn

from config import Settings
from db import Database
from web.app import create_app
from web.security import parse_listen, required_token

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, settings: Settings, daemon: Any = None):
        self.settings = settings
        self.daemon = daemon
        self.host, self.port = parse_listen(settings.http_listen)
        self.token = required_token(settings, self.host)  # WebConfigError: refuse to start
        self.server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._socket: Optional[socket.socket] = None
        self.app = None

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.set_inheritable(True)
        return sock

    def _server(self, db: Optional[Database] = None) -> uvicorn.Server:
        self.app = create_app(self.settings, self.token, db=db, daemon=self.daemon)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, server_header=False)
        return uvicorn.Server(config)

    def start(self) -> bool:
        """Serve from a thread; False (logged) when the address cannot be bound."""
        try:
            self._socket = self.bind()
        except OSError as exc:
            log.error("web pages not served: cannot listen on %s (%s); set http_listen to a free port, or off",
                      self.settings.http_listen, exc.strerror or exc)
            return False
        self.server = self._server()
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="qie-web", daemon=True)
        self._thread.start()
        log.info("web pages on %s%s", self.url, "" if self.token is None else " (token required)")
        return True

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        if self.server is None:
            return
        if self.app is not None:
            self.app.state.ctx.feed.close()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self.app is not None:
            self.app.state.ctx.db.close()
        self.server = None

    def run(self) -> int:
        """Serve in this thread until SIGINT/SIGTERM (``run.py web``)."""
        sock = self.bind()
        self.server = self._server()
        log.info("web pages on %s%s", self.url, "" if self.token is None else " (token required)")
        try:
            self.server.run(sockets=[sock])
        finally:
            self.app.state.ctx.feed.close()
            self.app.state.ctx.db.close()
        return 0
