"""What runs beside the compute loop for people: the web server and the notification sender.

``Services(settings, daemon)`` checks the web settings at once (a non-loopback ``http_listen``
without a token stops the daemon before it starts); ``start(db)`` starts the notification
thread and, unless ``http_listen`` is ``off`` or the daemon runs ``--once``, the web server in a
thread of its own. Neither is ever waited for by the compute loop.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from config import Settings
from db import Database
from processor.notify import NotificationSender

log = logging.getLogger(__name__)


class Services:
    def __init__(self, settings: Settings, daemon: Any = None, web: bool = True):
        self.settings = settings
        self.web = None
        if web and settings.http_listen != "off":
            from web import WebServer
            self.web = WebServer(settings, daemon=daemon)
        self.sender: Optional[NotificationSender] = None

    def start(self, db: Database) -> None:
        self.sender = NotificationSender(self.settings, db)
        self.sender.start()
        if self.web is not None and not self.web.start():
            self.web = None

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.sender is not None:
            self.sender.stop()
