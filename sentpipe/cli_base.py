"""What every CLI module shares: the one-line error, the settings loader, the two consoles."""

from __future__ import annotations

from typing import NoReturn

from pydantic import ValidationError
from rich.console import Console

from sentpipe.settings import Settings

out = Console()
err = Console(stderr=True)


class CliError(Exception):
    """A failure the user can act on; printed as one line."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "SENTPIPE_" + "_".join(str(p) for p in first["loc"]).upper()
        fail(f"invalid setting {name}: {first['msg']}")
