"""The console's guards at the HTTP level: token, cookie, CSRF, loopback, dry run first, trigger only in dev.

The app runs in this process against the real broker and database (its tail and sampler run as in
production); the browser tests (test_console_browser.py) show the same from a real Chromium.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from sentpipe.console import check_bind, create_app
from sentpipe.console.app import SAMPLER, send_json
from sentpipe.settings import DEVELOPMENT_SECRET, Settings
from tests.processes import settings_env

TOKEN = "console-test-token-0123456789"


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[str]:
    s = settings.model_copy(update={"console_token": SecretStr(TOKEN), "console_metrics_urls": []})
    server = TestServer(create_app(s), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def sign_in(http: ClientSession, base: str, token: str = TOKEN) -> tuple[int, str]:
    """GET /login, POST the form with its CSRF token; the status and the page's CSRF token afterwards."""
    async with http.get(f"{base}/login") as resp:
        page = await resp.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None, page
    async with http.post(
        f"{base}/login", data={"csrf": csrf.group(1), "token": token}, allow_redirects=False
    ) as resp:
        status = resp.status
    if status != 303:
        return status, ""
    async with http.get(f"{base}/api/session") as resp:
        return status, (await resp.json())["csrf"]


def test_a_console_beyond_loopback_needs_a_token(settings: Settings) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    with pytest.raises(ValueError, match="SENTPIPE_CONSOLE_TOKEN is required"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ValueError, match="listens on every interface"):
        check_bind("", None)
    with pytest.raises(ValueError, match="at least 16"):
        check_bind("0.0.0.0", "short")
    check_bind("0.0.0.0", TOKEN)
    res = subprocess.run(
        [sys.executable, "-m", "sentpipe", "console", "--host", "0.0.0.0"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SENTPIPE_CONSOLE_TOKEN is required"), res.stderr


async def test_sign_in_sets_an_httponly_samesite_cookie_and_refuses_a_wrong_token(console: str) -> None:
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
        async with http.get(f"{console}/api/session") as resp:
            assert resp.status == 401 and (await resp.json())["code"] == "sign_in_required"
        async with http.get(f"{console}/", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/login"
        async with http.get(f"{console}/login") as resp:
            # The sign-in form makes no session: its CSRF token is bound to a cookie of its own.
            assert "sentpipe_console" not in resp.cookies
            login_cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in login_cookie and "SameSite=Strict" in login_cookie
        # The sign-in form itself needs its CSRF token.
        async with http.post(f"{console}/login", data={"token": TOKEN}, allow_redirects=False) as resp:
            assert resp.status == 403
        status, _ = await sign_in(http, console, token="wrong-token-wrong-token")
        assert status == 401
        async with http.get(f"{console}/api/session") as resp:
            assert resp.status == 401
    # A session id planted before sign-in is worth nothing after it: sign-in issues a new one.
    planted = "planted-session-id"
    async with ClientSession(
        cookie_jar=CookieJar(unsafe=True), cookies={"sentpipe_console": planted}
    ) as http:
        page = await (await http.get(f"{console}/login")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        async with http.post(
            f"{console}/login", data={"csrf": csrf.group(1), "token": TOKEN}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            cookie = resp.cookies["sentpipe_console"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert cookie.value != planted
        async with http.get(f"{console}/api/session") as resp:
            assert resp.status == 200
            info = await resp.json()
        assert info["signed_in"] is True and len(info["csrf"]) > 20
    async with (
        ClientSession(cookie_jar=CookieJar(unsafe=True), cookies={"sentpipe_console": planted}) as http,
        http.get(f"{console}/api/session") as resp,
    ):
        assert resp.status == 401
    # The form's CSRF token is bound to the browser's cookie: someone else's form token is refused.
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as other:
        await (await other.get(f"{console}/login")).text()
        async with other.post(
            f"{console}/login", data={"csrf": csrf.group(1), "token": TOKEN}, allow_redirects=False
        ) as resp:
            assert resp.status == 403


async def test_every_post_needs_the_csrf_token_and_a_real_run_needs_a_dry_run(console: str) -> None:
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
        status, csrf = await sign_in(http, console)
        assert status == 303
        body = {"dry_run": False}
        async with http.post(f"{console}/api/replay", json=body) as resp:
            assert resp.status == 403
            assert "CSRF" in (await resp.json())["error"] and (await resp.json())["code"] == "bad_csrf_token"
        async with http.post(f"{console}/api/replay", json=body, headers={"X-CSRF-Token": "x" * 43}) as resp:
            assert resp.status == 403
        async with http.post(
            f"{console}/api/dlq/redrive",
            json=body,
            headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        ) as resp:
            assert resp.status == 403
        async with http.post(f"{console}/api/trigger", json={"type": "message.status.updated"}) as resp:
            assert resp.status == 403
        # With the token: a real replay or redrive without a dry run of the same settings is refused.
        headers = {"X-CSRF-Token": csrf}
        async with http.post(f"{console}/api/replay", json=body, headers=headers) as resp:
            assert resp.status == 409 and "dry run" in (await resp.json())["error"]
            assert (await resp.json())["code"] == "dry_run_first"
        async with http.post(f"{console}/api/dlq/redrive", json=body, headers=headers) as resp:
            assert resp.status == 409
        async with http.post(
            f"{console}/api/replay", json={"since": "yesterday", "dry_run": True}, headers=headers
        ) as resp:
            assert resp.status == 400 and "ISO-8601" in (await resp.json())["error"]
            assert (await resp.json())["code"] == "bad_request"


async def test_without_a_token_only_loopback_host_names_are_answered(settings: Settings) -> None:
    server = TestServer(
        create_app(settings.model_copy(update={"console_metrics_urls": []})), host="127.0.0.1"
    )
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
            async with http.get(f"{base}/api/session") as resp:
                assert resp.status == 200  # loopback, no token: a session at once
                csrf = (await resp.json())["csrf"]
            async with http.get(f"{base}/api/session", headers={"Host": "rebound.example:8090"}) as resp:
                assert resp.status == 403
            # Any loopback address may be the one it listens on (`--host 127.0.0.2`): it printed that URL
            # and answered every request there 403. A rebinding page's Host is its own name, never an IP.
            for host in ("127.0.0.2:8090", "[::1]:8090", "localhost"):
                async with http.get(f"{base}/api/session", headers={"Host": host}) as resp:
                    assert resp.status == 200, host
            for host in ("10.0.0.1:8090", "127.0.0.1.rebound.example", "0.0.0.0:8090"):
                async with http.get(f"{base}/api/session", headers={"Host": host}) as resp:
                    assert resp.status == 403, host
            # Another site's page (an <img> pointing at the API) needs no session here: its browser's own
            # word that the request is cross-site, or a foreign Origin, is refused; the console's page is not.
            for headers in (
                {"Sec-Fetch-Site": "cross-site"},
                {"Sec-Fetch-Site": "same-site"},
                {"Origin": "http://localhost:9999"},
            ):
                async with http.get(f"{base}/api/search?q=x", headers=headers) as resp:
                    assert (resp.status, (await resp.json())["code"]) == (403, "cross_site"), headers
            for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": base}):
                async with http.get(f"{base}/api/session", headers=headers) as resp:
                    assert resp.status == 200, headers
            async with http.post(f"{base}/api/replay", json={"dry_run": True}) as resp:
                assert resp.status == 403  # still needs the CSRF token
            async with http.post(
                f"{base}/api/replay", json={"dry_run": True}, headers={"X-CSRF-Token": csrf}
            ) as resp:
                assert resp.status == 202
    finally:
        await server.close()


@pytest.mark.parametrize("given_by", ["environment", "secrets file"])
async def test_test_events_only_with_the_development_secret(
    settings: Settings, tmp_path: Path, given_by: str
) -> None:
    """A secrets file can give the default tenant its own secret: the page offered test events all the same,
    signed with the development secret the ingress no longer took, and each one came back 401."""
    real = "whsec_cHJvZHVjdGlvbi1zZWNyZXQ="
    if given_by == "environment":
        update: dict[str, object] = {"webhook_secret": SecretStr(real)}
    else:
        (tmp_path / "secrets.json").write_bytes(orjson.dumps({settings.default_tenant: real}))
        update = {"webhook_secret": SecretStr(DEVELOPMENT_SECRET), "secrets_file": tmp_path / "secrets.json"}
    s = settings.model_copy(update={**update, "console_metrics_urls": []})
    assert not s.uses_development_secret
    server = TestServer(create_app(s), host="127.0.0.1")
    await server.start_server()
    if given_by == "secrets file":
        # Read once at start, as the ingress reads it (not from disk, on the loop, at every call): an edit
        # made since changes neither process's answer.
        (tmp_path / "secrets.json").write_bytes(orjson.dumps({settings.default_tenant: DEVELOPMENT_SECRET}))
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
            async with http.get(f"{base}/api/session") as resp:
                info = await resp.json()
            assert info["trigger"] is False
            async with http.post(
                f"{base}/api/trigger",
                json={"type": "message.status.updated"},
                headers={"X-CSRF-Token": info["csrf"]},
            ) as resp:
                assert resp.status == 403 and "development secret" in (await resp.json())["error"]
    finally:
        await server.close()


PASSWORD = "pa55-in-a-url-9f3c"


async def test_a_password_in_the_ingress_url_is_not_in_the_test_events_answer(
    settings: Settings, ingress: str
) -> None:
    """`POST /api/trigger` answered the ingress URL as configured: a password in it came back to the page."""
    target = ingress.replace("http://", f"http://someone:{PASSWORD}@") + "/webhooks/sent"
    s = settings.model_copy(update={"console_ingress_url": target, "console_metrics_urls": []})
    server = TestServer(create_app(s), host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
            async with http.get(f"{base}/api/session") as resp:
                csrf = (await resp.json())["csrf"]
            async with http.post(
                f"{base}/api/trigger", json={"type": "message.status.updated"}, headers={"X-CSRF-Token": csrf}
            ) as resp:
                text = await resp.text()
                assert resp.status == 200, text
        assert PASSWORD not in text and "someone" not in text, text
        assert f'"url":"{ingress}/webhooks/sent"' in text, text
    finally:
        await server.close()


async def test_a_password_in_a_metrics_url_is_not_in_the_overview(settings: Settings) -> None:
    """A metrics URL that could not be scraped was listed under `problems.metrics` as configured."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://someone:{PASSWORD}@127.0.0.1:{port}/metrics"
    app = create_app(settings.model_copy(update={"console_metrics_urls": [url]}))
    sampler = app[SAMPLER]
    async with ClientSession() as http:
        await sampler._scrape(http)
    text = send_json(sampler.overview()).text or ""
    assert PASSWORD not in text and "someone" not in text, text
    assert sampler.overview()["problems"]["metrics"] == {
        f"http://127.0.0.1:{port}/metrics": "ClientConnectorError"
    }
