"""Who may use the console: loopback or a token, a session cookie, a CSRF token on every POST.

- Bound to anything but loopback, the console needs `SENTPIPE_CONSOLE_TOKEN`; it refuses to start without.
- With a token, a browser signs in once (POST /login); the session cookie is HttpOnly and SameSite=Strict.
- Without a token (loopback only) every browser on this machine gets a session at once, but requests must
  name a loopback host, so a web page cannot reach the console through DNS rebinding.
- Every POST carries the session's CSRF token (header `X-CSRF-Token` or form field `csrf`) and, when the
  browser sends an Origin, that origin must be the console's own.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

COOKIE = "sentpipe_console"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """ValueError (one line) when the console would listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"SENTPIPE_CONSOLE_TOKEN is required when the console listens on {host} (not loopback);"
            " set it, or listen on 127.0.0.1"
        )
    if token is not None and len(token) < 16:
        raise ValueError("SENTPIPE_CONSOLE_TOKEN must be at least 16 characters")


@dataclass
class Session:
    id: str
    csrf: str
    authenticated: bool
    created: float = field(default_factory=time.monotonic)
    # kind ("replay", "redrive") -> fingerprint of the settings of the last finished dry run: the real run
    # of exactly those settings is allowed, nothing else.
    confirmed: dict[str, str] = field(default_factory=dict)


class Sessions:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self._by_id: dict[str, Session] = {}

    def new(self, authenticated: bool) -> Session:
        now = time.monotonic()
        if len(self._by_id) >= MAX_SESSIONS:
            for sid in [k for k, s in self._by_id.items() if now - s.created > SESSION_TTL_S]:
                del self._by_id[sid]
            while len(self._by_id) >= MAX_SESSIONS:  # the oldest go first
                del self._by_id[next(iter(self._by_id))]
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), authenticated)
        self._by_id[s.id] = s
        return s

    def get(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        s = self._by_id.get(sid) if sid else None
        if s is not None and time.monotonic() - s.created > SESSION_TTL_S:
            del self._by_id[s.id]
            return None
        return s

    def drop(self, s: Session) -> None:
        self._by_id.pop(s.id, None)

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def set_cookie(response: web.StreamResponse, request: web.Request, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        session.id,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
        max_age=SESSION_TTL_S,
    )


def csrf_ok(request: web.Request, session: Session | None, form_value: str | None = None) -> bool:
    if session is None:
        return False
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    offered = request.headers.get(CSRF_HEADER) or form_value or ""
    return bool(offered) and hmac.compare_digest(offered.encode(), session.csrf.encode())


def host_is_loopback(request: web.Request) -> bool:
    """The Host the browser asked for names this machine (a DNS-rebinding page names its own host)."""
    host = request.host
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in LOOPBACK_NAMES
