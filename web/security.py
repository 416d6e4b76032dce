"""Who may use the web server, and how state-changing requests are protected.

- **Loopback** (``http_listen`` on 127.0.0.0/8, ::1 or localhost): no login. Requests must name
  the server by a loopback name in their ``Host`` header, so a web page whose domain was made to
  resolve to 127.0.0.1 (DNS rebinding) cannot read it.
- **Any other address**: a token is required, from ``http_token`` or the 0600 file
  ``http_token_file`` (``python run.py http-token`` makes one); without one the server refuses
  to start. Every page, API call and ``/metrics`` needs it: ``Authorization: Bearer <token>``,
  or the session cookie the login page sets (an HMAC of the token, never the token itself).
- **Cross-site requests**: a state-changing request (POST) from a browser (it carries cookies,
  ``Origin`` or ``Sec-Fetch-Site``) must come from the same origin and carry the CSRF token (the
  ``qie_csrf`` cookie, repeated in the form's ``csrf`` field or the ``X-CSRF-Token`` header). A
  request with a valid bearer token, or from a program that sends none of these headers, is not
  a browser's and needs neither.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlsplit

from config import ConfigurationError, Settings
from processor.files import write_atomic

CSRF_COOKIE = "qie_csrf"
SESSION_COOKIE = "qie_session"
OPEN_PATHS = ("/login", "/static/")  # reachable without the token
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MACHINE_PATHS = ("/api/", "/metrics", "/healthz", "/readyz", "/openapi.json", "/static/", "/events")


class WebConfigError(ConfigurationError):
    """The web server cannot start with these settings; the message says what to set."""


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as a host and a port."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WebConfigError(f"http_listen {value!r}: give host:port, e.g. 127.0.0.1:8765, or off")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> Optional[str]:
    """The token in ``path``, None when there is no such file; refused when others may read it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_IMODE(mode) & 0o077:
        raise WebConfigError(f"{path} may be read by other users (mode {stat.S_IMODE(mode):o}); "
                             f"run: chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16:
        raise WebConfigError(f"{path} holds no token of 16 characters or more")
    return token


def make_token_file(path: Path) -> str:
    """Write a new random token to ``path`` (mode 0600); the token."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (token + "\n").encode(), mode=0o600)
    return token


def required_token(settings: Settings, host: str) -> Optional[str]:
    """The token requests need, None on a loopback address. Raises WebConfigError when the
    address is not a loopback one and no token is set."""
    if is_loopback(host):
        return None
    if settings.http_token:
        return settings.http_token
    path = settings.effective_http_token_file
    token = read_token_file(path)
    if token is None:
        raise WebConfigError(
            f"http_listen {settings.http_listen} is not a loopback address, and no token is set: refusing to "
            f"serve pages to the network without one. Set http_token (QIE_HTTP_TOKEN), or run "
            f"`python run.py http-token` to generate one in {path} (mode 0600), or listen on 127.0.0.1")
    return token


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"qie-hotfolder web session", "sha256").hexdigest()


def same(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class Guard:
    """ASGI middleware: the Host check on loopback, the token, the same-origin rule for state
    changes, and the CSRF cookie. Marks the request (``scope["state"]``) with ``bearer`` (it
    carried the token in its header), ``browser`` and ``csrf`` (the cookie's value)."""

    def __init__(self, app: Any, token: Optional[str], loopback: bool, port: int):
        self.app = app
        self.token = token
        self.loopback = loopback
        self.port = port

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        cookies = _cookies(headers.get("cookie", ""))
        path = scope["path"]
        state = scope.setdefault("state", {})
        if self.loopback and not _loopback_host(headers.get("host", "")):
            await _plain(send, 421, "this server answers only to a loopback name (127.0.0.1, localhost, [::1])")
            return
        bearer = headers.get("authorization", "")
        state["bearer"] = bool(self.token) and bearer.startswith("Bearer ") and same(bearer[7:].strip(), self.token)
        if self.token and not state["bearer"] and not path.startswith(OPEN_PATHS):
            if not same(cookies.get(SESSION_COOKIE), session_value(self.token)):
                await self._refuse(scope, send, headers)
                return
        state["browser"] = (CSRF_COOKIE in cookies or SESSION_COOKIE in cookies or "origin" in headers
                            or "sec-fetch-site" in headers)
        if scope["method"] not in SAFE_METHODS and not state["bearer"]:
            problem = _cross_site(headers, scope)
            if problem:
                await _plain(send, 403, problem)
                return
        csrf = cookies.get(CSRF_COOKIE)
        new_csrf = None if csrf and len(csrf) >= 20 else secrets.token_urlsafe(24)
        state["csrf"] = csrf if new_csrf is None else new_csrf
        if new_csrf is None or path.startswith(MACHINE_PATHS):  # programs are given no cookie
            await self.app(scope, receive, send)
            return
        secure = scope.get("scheme") == "https"

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{CSRF_COOKIE}={new_csrf}; Path=/; SameSite=Strict" + ("; Secure" if secure else "")
                message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _refuse(self, scope: dict, send: Any, headers: dict[str, str]) -> None:
        wants_html = "text/html" in headers.get("accept", "") and scope["method"] == "GET"
        if wants_html and not scope["path"].startswith("/api/"):
            target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", f"/login?next={quote(target)}".encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        await _plain(send, 401, "a token is needed: Authorization: Bearer <token> (see docs/web.md)",
                     [(b"www-authenticate", b'Bearer realm="qie-hotfolder"')])


def check_csrf(state: Any, given: Optional[str]) -> bool:
    """Whether a state-changing request may go ahead: a bearer-token or non-browser request, or a
    browser's carrying the CSRF cookie's value."""
    if getattr(state, "bearer", False) or not getattr(state, "browser", False):
        return True
    return same(given, getattr(state, "csrf", None))


def local_path(target: Optional[str], default: str = "/") -> str:
    """A redirect target that stays on this server (a path, never ``//host`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    return default if parts.scheme or parts.netloc else target


def _cross_site(headers: dict[str, str], scope: dict) -> Optional[str]:
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site and fetch_site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
    origin = headers.get("origin")
    if origin and origin != "null":
        if urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            return "cross-site request refused (its Origin is not this server)"
    elif origin == "null":
        return "cross-site request refused (Origin: null)"
    return None


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name.strip("[]"))


def _cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - a malformed cookie header counts as none
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


async def _plain(send: Any, status: int, text: str, extra: Optional[list] = None) -> None:
    await send_body(send, status, (text + "\n").encode(), b"text/plain; charset=utf-8", extra)


async def send_body(send: Any, status: int, body: bytes, content_type: bytes, extra: Optional[list] = None) -> None:
    """A whole response from ASGI middleware."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
