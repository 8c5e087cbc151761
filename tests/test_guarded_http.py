"""`error_answer`: a refused request is counted only when its answer can still be sent."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.http_exceptions import BadStatusLine

from sentpipe.guarded_http import error_answer

log = logging.getLogger("test")


def _request(sent: int) -> Any:
    return SimpleNamespace(writer=SimpleNamespace(output_size=sent))


def test_a_refusal_is_counted_with_its_answer() -> None:
    told: list[tuple[str, int]] = []
    answer = error_answer(_request(0), 400, BadStatusLine("x"), log, lambda c, s: told.append((c, s)))
    assert answer.status == 400
    assert told == [("malformed_request", 400)]


def test_a_refusal_after_an_answer_was_sent_is_not_counted() -> None:
    told: list[tuple[str, int]] = []
    with pytest.raises(ConnectionError):
        error_answer(_request(17), 400, BadStatusLine("x"), log, lambda c, s: told.append((c, s)))
    assert told == []


def test_a_bug_is_not_counted_as_a_refusal() -> None:
    told: list[tuple[str, int]] = []
    answer = error_answer(_request(0), 500, RuntimeError("bug"), log, lambda c, s: told.append((c, s)))
    assert answer.status == 500
    assert told == []
