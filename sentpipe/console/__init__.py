"""`sentpipe console`: a web console for debugging webhooks (live events, trace, search, DLQ, replay)."""

from __future__ import annotations

from sentpipe.console.app import CannotListen, browser_url, create_app, run
from sentpipe.console.auth import check_bind

__all__ = ["CannotListen", "browser_url", "check_bind", "create_app", "run"]
