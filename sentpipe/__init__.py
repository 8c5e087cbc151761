"""sentpipe: Sent's webhooks into a durable, deduplicated, replayable Kafka pipeline.

The handler API is the one import a user needs::

    from sentpipe import CanonicalEvent, HandlerContext, PermanentError, RetryableError, handler
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sentpipe.processors.handlers import HandlerContext, PermanentError, RetryableError, handler
    from sentpipe.schemas.events import CanonicalEvent

# Imported on first use: the ingress and the CLI import `sentpipe` too and need none of the worker's code.
_PUBLIC = {
    "handler": "sentpipe.processors.handlers",
    "HandlerContext": "sentpipe.processors.handlers",
    "PermanentError": "sentpipe.processors.handlers",
    "RetryableError": "sentpipe.processors.handlers",
    "CanonicalEvent": "sentpipe.schemas.events",
}

__all__ = ["CanonicalEvent", "HandlerContext", "PermanentError", "RetryableError", "__version__", "handler"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sentpipe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
