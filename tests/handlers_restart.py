"""A handler whose first call ends the projector's process asking for a new one (EXIT_RESTART), as the
projector does when librdkafka leaves a commit unanswered for good; later calls pass."""

from __future__ import annotations

import os
from pathlib import Path

from sentpipe.processors.handlers import HandlerContext, handler
from sentpipe.processors.projector import EXIT_RESTART
from sentpipe.schemas.events import CanonicalEvent


@handler("message.inbound.received", name="test-restart")
async def restart_once(event: CanonicalEvent, ctx: HandlerContext) -> None:
    marker = Path(os.environ["TEST_RESTART_MARKER"])
    if not marker.exists():  # noqa: ASYNC240 - a test's marker: microseconds, and the process ends next
        marker.write_text(event.id)  # noqa: ASYNC240
        os._exit(EXIT_RESTART)
