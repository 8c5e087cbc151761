"""Who may use the console: loopback or a token, a session cookie, a CSRF token on every POST.

- Bound to anything but loopback, the console needs `SENTPIPE_CONSOLE_TOKEN`; it refuses to start without.
- With a token, a browser signs in once (POST /login); the session cookie is HttpOnly and SameSite=Strict.
  Only a sign-in creates a session: the sign-in form's CSRF token is bound to a cookie of its own
  (signed with a key of this process), so nobody can fill the session table without the token.
- Without a token (loopback only) GETs need no session, but requests must name a loopback host, so a web
  page cannot reach the console through DNS rebinding; the page gets a session (its CSRF token) from
  /api/session.
- Every POST carries the session's CSRF token (header `X-CSRF-Token` or form field `csrf`) and, when the
  browser sends an Origin, that origin must be the console's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

COOKIE = "sentpipe_console"
LOGIN_COOKIE = "sentpipe_console_login"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
LOGIN_TTL_S = 3600
MAX_SESSIONS = 10_000


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
            # An empty host is every interface (it read "listens on  (not loopback)").
            f"SENTPIPE_CONSOLE_TOKEN is required when the console listens on {host or 'every interface'}"
            " (not loopback); set it, or listen on 127.0.0.1"
        )
    if token is not None and len(token) < 16:
        raise ValueError("SENTPIPE_CONSOLE_TOKEN must be at least 16 characters")


@dataclass
class Session:
    id: str
    csrf: str
    # Signed in with the token; without a token no session is, and the loopback check stands in for it.
    signed_in: bool
    created: float = field(default_factory=time.monotonic)
    # kind ("replay", "redrive") -> fingerprint of the settings of the last finished dry run and the end
    # offsets it read to: the real run of exactly those settings is allowed, up to those offsets, nothing
    # else (records arrived since were not counted).
    confirmed: dict[str, tuple[str, dict[int, int]]] = field(default_factory=dict)


class Sessions:
    """The sessions of this process, at most `max_sessions`.

    At the cap the first to go are sessions whose cookie never came back (what a flood of cookie-less
    requests leaves), then other sessions not signed in, then signed-in ones; each least recently used
    first.
    """

    def __init__(self, token: str | None, max_sessions: int = MAX_SESSIONS) -> None:
        self.token = token
        self.max_sessions = max_sessions
        self._key = secrets.token_bytes(32)
        # Wrong tokens are answered one at a time for the whole console: a delay per request alone let 1,000
        # parallel guesses through in under 2 s.
        self.wrong_token = asyncio.Lock()
        # Eviction tiers, in eviction order; each dict in least-recently-used order.
        self._unreturned: OrderedDict[str, Session] = OrderedDict()
        self._unsigned: OrderedDict[str, Session] = OrderedDict()
        self._signed: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._unreturned) + len(self._unsigned) + len(self._signed)

    def new(self, signed_in: bool) -> Session:
        while len(self) >= max(1, self.max_sessions):
            self._evict_one()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), signed_in)
        (self._signed if signed_in else self._unreturned)[s.id] = s
        return s

    def _evict_one(self) -> None:
        if not self._unreturned:
            now = time.monotonic()
            for tier in (self._unsigned, self._signed):
                for sid in [k for k, s in tier.items() if now - s.created > SESSION_TTL_S]:
                    del tier[sid]
        for tier in (self._unreturned, self._unsigned, self._signed):
            if tier:
                tier.popitem(last=False)
                return

    def get(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        for tier in (self._unreturned, self._unsigned, self._signed):
            s = tier.get(sid)
            if s is None:
                continue
            if time.monotonic() - s.created > SESSION_TTL_S:
                del tier[sid]
                return None
            if tier is self._unreturned:
                del tier[sid]
                self._unsigned[sid] = s
            else:
                tier.move_to_end(sid)
            return s
        return None

    def drop(self, s: Session) -> None:
        for tier in (self._unreturned, self._unsigned, self._signed):
            tier.pop(s.id, None)

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(as_bytes(offered), self.token.encode())

    def login_csrf(self, nonce: str) -> str:
        """The sign-in form's CSRF token for the nonce in its cookie: nothing kept, nothing to flood."""
        return hmac.new(self._key, b"login:" + as_bytes(nonce), hashlib.sha256).hexdigest()

    def login_csrf_ok(self, request: web.Request, offered: str) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or not offered or not same_origin(request):
            return False
        return hmac.compare_digest(as_bytes(offered), self.login_csrf(nonce).encode())


def as_bytes(text: str) -> bytes:
    """A client's text as bytes to compare. aiohttp hands on header bytes that are not UTF-8 as lone
    surrogates, which a plain encode() refuses (a 500 before sign-in); such text matches no token."""
    return text.encode("utf-8", "surrogatepass")


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


def set_login_cookie(response: web.StreamResponse, request: web.Request, nonce: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/login",
        max_age=LOGIN_TTL_S,
    )


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def cross_site(request: web.Request) -> bool:
    """Made by another site's page: the browser says so (Sec-Fetch-Site), or the Origin it sent does."""
    site = request.headers.get("Sec-Fetch-Site")
    return (site is not None and site not in ("same-origin", "none")) or not same_origin(request)


def csrf_ok(request: web.Request, session: Session | None, form_value: str | None = None) -> bool:
    if session is None or not same_origin(request):
        return False
    offered = request.headers.get(CSRF_HEADER) or form_value or ""
    return bool(offered) and hmac.compare_digest(as_bytes(offered), session.csrf.encode())


def host_is_loopback(request: web.Request) -> bool:
    """The Host the browser asked for names this machine (a DNS-rebinding page names its own host)."""
    host = request.host
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name)
