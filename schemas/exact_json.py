"""JSON whose numbers survive the trip to PostgreSQL: orjson, except for numbers a double cannot hold.

orjson reads 123456789012345678901234567890 as 1.2345678901234568e+29, 0.1000000000000000055511 as 0.1
and 1e-400 as 0.0, and refuses 1e400: all valid JSON that jsonb keeps exactly, and the payload is stored
as received. Only a float can have lost something (an integer orjson cannot hold exactly comes back as a
float too), so a document without one is orjson's as it is; one with a float is read again by the standard
library, each number that a float (or a 64-bit integer) would change kept as a `decimal.Decimal`. `dumps`
writes a Decimal as its own digits, so a routed record and the jsonb column carry the number as sent.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import orjson

# The integers orjson reads and writes exactly; also the integer ids the canonical model takes (events).
INT_MIN, UINT_MAX = -(2**63), 2**64 - 1


def loads(data: bytes, *, exact: bool = True) -> Any:
    """`orjson.loads`, with every number as written; raises orjson.JSONDecodeError (a ValueError).

    `exact=False` is for a caller that only checks the document and keeps the bytes (the ingress): a
    number may come back rounded, but what orjson alone would refuse (1e400) is still read.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "number" not in str(exc):  # "number is infinity when parsed as double": 1e400
            raise
        return _exact(data)
    # Inexact, orjson reads an exponent no Decimal holds (1e-99999999999999999999) as 0.0 where the exact
    # read refuses it: the ingress answers 200 and the router dead-letters the record (stage route) instead
    # of the ingress (stage ingress). Looking for one is a float walk of every document (1.0 us for a
    # sample event, more than the parse's 0.8 us; about 1% of a request) for a number nobody sends.
    return _exact(data) if exact and _has_float(doc) else doc


def dumps(obj: Any, option: int = 0) -> bytes:
    """`orjson.dumps` that also writes the Decimals `loads` makes, digit for digit."""
    return orjson.dumps(obj, default=_digits, option=option)


def pretty(data: bytes) -> str | None:
    """The JSON in `data` indented for a person, numbers as written; None when it is not JSON."""
    try:
        return dumps(loads(data), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # not JSON, or nested beyond orjson's 255
        return None


def _has_float(doc: Any) -> bool:
    # Iterative: the depth limit is checked after the parse, and a recursion here must not come first.
    stack = [doc]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
        elif t is float:
            return True
    return False


def _exact(data: bytes) -> Any:
    try:
        # Strict UTF-8 first: the standard library would also guess UTF-16 and UTF-32, which orjson refuses.
        doc = json.loads(
            data.decode("utf-8"), parse_float=_float, parse_int=_int, parse_constant=_no_constant
        )
        # Whatever orjson refuses beyond the number it stopped at (a lone surrogate, say) stays refused.
        dumps(doc)
    except RecursionError:
        raise orjson.JSONDecodeError("nesting beyond the recursion depth", "", 0) from None
    except ArithmeticError:  # decimal.InvalidOperation: an exponent of 19 digits or more
        raise orjson.JSONDecodeError("a number beyond what can be held", "", 0) from None
    except (ValueError, TypeError) as exc:  # orjson.JSONEncodeError is a TypeError
        text = str(exc).lower()
        reason = "nesting beyond the recursion depth" if "recursion" in text else "invalid JSON"
        raise orjson.JSONDecodeError(reason, "", 0) from None
    return doc


def _float(text: str) -> float | Decimal:
    value = float(text)
    if math.isfinite(value) and Decimal(repr(value)) == Decimal(text):
        return value  # exact enough: the same number, maybe with fewer trailing zeros
    return Decimal(text)


def _int(text: str) -> int | Decimal:
    # Longer than any 64-bit integer: never through int(), which refuses more than 4,300 digits.
    if len(text) > 20:
        return Decimal(text)
    value = int(text)
    return value if INT_MIN <= value <= UINT_MAX else Decimal(text)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _digits(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal) and value.is_finite():
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
