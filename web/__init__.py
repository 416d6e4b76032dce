"""The web pages, JSON API, live updates and metrics of the daemon (docs/web.md)."""

from web.app import create_app
from web.security import WebConfigError, make_token_file, required_token
from web.server import WebServer

__all__ = ["create_app", "WebConfigError", "make_token_file", "required_token", "WebServer"]
