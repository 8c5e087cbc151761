"""Realistic sample events in both envelope shapes, for the sender, tests and benchmarks."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from sentpipe.schemas.events import EventType

Shape = Literal["sent", "guide"]
OUTBOUND_PATH = ("queued", "routed", "sent", "delivered", "read")
CHANNELS = ("sms", "whatsapp", "rcs")
TEMPLATE_STATUSES = ("pending", "approved", "rejected", "paused")


@dataclass(frozen=True, slots=True)
class Sample:
    type: EventType
    body: bytes
    doc: dict[str, Any]


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _phone(rng: random.Random) -> str:
    return "+1" + "".join(str(rng.randint(0, 9)) for _ in range(10))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class SampleFactory:
    """Deterministic for a given seed, so tests and benchmarks can recompute what they sent."""

    def __init__(self, seed: int | None = None, account_id: str | None = None) -> None:
        self.rng = random.Random(seed)
        self.account_id = account_id or _uuid(self.rng)
        # Seeded, a clock of its own, so that a seed makes the same bodies again; otherwise the time each
        # event is made: advanced 5 ms to 2 s per event, a run of thousands was stamped minutes ahead of
        # its arrival (and searches for "the last minutes" missed it).
        self.seeded = seed is not None
        self.clock = datetime(2026, 1, 1, tzinfo=UTC) if self.seeded else datetime.now(UTC)

    def _tick(self) -> datetime:
        step = timedelta(milliseconds=self.rng.randint(5, 2000))
        if self.seeded:
            self.clock += step
        else:  # later than the last one: a message's statuses keep their order
            self.clock = max(self.clock + timedelta(milliseconds=1), datetime.now(UTC))
        return self.clock

    def _wrap(
        self,
        type_: EventType,
        shape: Shape,
        field: str,
        sub_type: str | None,
        payload: dict[str, Any],
        at: datetime,
    ) -> Sample:
        if shape == "sent":
            doc: dict[str, Any] = {"field": field}
            if sub_type is not None:
                doc["sub_type"] = sub_type
            doc |= {"timestamp": _iso(at), "payload": payload}
        else:
            doc = {
                "id": "evt_" + _uuid(self.rng).replace("-", ""),
                "event": {"type": type_.value},
                "created_at": _iso(at),
                "data": payload,
            }
        return Sample(type_, orjson.dumps(doc), doc)

    def message_status(
        self, message_id: str, status: str, shape: Shape = "sent", at: datetime | None = None
    ) -> Sample:
        payload = {
            "account_id": self.account_id,
            "message_id": message_id,
            "message_status": status.upper(),
            "channel": self.rng.choice(CHANNELS),
            "inbound_number": _phone(self.rng),
            "outbound_number": _phone(self.rng),
            "template_id": _uuid(self.rng),
        }
        return self._wrap(
            EventType.MESSAGE_STATUS, shape, "message", f"message.{status}", payload, at or self._tick()
        )

    def message_lifecycle(self, shape: Shape = "sent") -> list[Sample]:
        """One message's statuses in Sent's partial order: some steps skipped, some messages failing."""
        message_id = _uuid(self.rng)
        roll = self.rng.random()
        if roll < 0.1:
            path = ["queued", "routed", "failed"]
        else:
            end = self.rng.randint(2, len(OUTBOUND_PATH) - 1)
            path = [
                s for s in OUTBOUND_PATH[: end + 1] if s in ("queued", "delivered") or self.rng.random() > 0.3
            ]
        return [self.message_status(message_id, s, shape) for s in path]

    def inbound(self, shape: Shape = "sent") -> Sample:
        at = self._tick()
        payload = {
            "account_id": self.account_id,
            "from": _phone(self.rng),
            "to": _phone(self.rng),
            "text": self.rng.choice(["Hello", "STOP", "Where is my order?", "Yes, confirm", "Thanks! 👍"]),
            "channel": self.rng.choice(CHANNELS),
            "provider": self.rng.choice(["twilio", "sinch", "meta"]),
            "received_at": _iso(at - timedelta(milliseconds=300)),
        }
        return self._wrap(EventType.MESSAGE_INBOUND, shape, "message", "message.received", payload, at)

    def template(
        self, template_id: str | None = None, status: str | None = None, shape: Shape = "sent"
    ) -> Sample:
        status = status or self.rng.choice(TEMPLATE_STATUSES)
        payload = {
            "account_id": self.account_id,
            "template_id": template_id or _uuid(self.rng),
            "template_name": self.rng.choice(["order_confirmation", "otp", "shipping_update"]),
            "whatsapp_template_id": str(self.rng.randint(10**15, 10**16 - 1)),
            # Sent sends upper- or lower-case statuses.
            "status": status.upper() if self.rng.random() < 0.5 else status,
            "language": "en_US",
            "category": "UTILITY",
            "channel": "whatsapp",
            "reason": "INVALID_FORMAT" if status == "rejected" else None,
        }
        return self._wrap(EventType.TEMPLATE_APPROVAL, shape, "templates", None, payload, self._tick())

    def template_history(self, shape: Shape = "sent") -> list[Sample]:
        template_id = _uuid(self.rng)
        n = self.rng.randint(1, 4)
        return [self.template(template_id, self.rng.choice(TEMPLATE_STATUSES), shape) for _ in range(n)]

    def of_type(self, type_: EventType, shape: Shape = "sent") -> list[Sample]:
        if type_ is EventType.MESSAGE_STATUS:
            return self.message_lifecycle(shape)
        if type_ is EventType.MESSAGE_INBOUND:
            return [self.inbound(shape)]
        if type_ is EventType.TEMPLATE_APPROVAL:
            return self.template_history(shape)
        raise ValueError(f"no samples for {type_}")

    def mix(self, n: int, shape: Shape | Literal["mixed"] = "sent") -> list[Sample]:
        """About n unique events of all three types, each entity's events in their true order."""
        out: list[Sample] = []
        while len(out) < n:
            s: Shape = self.rng.choice(("sent", "guide")) if shape == "mixed" else shape
            roll = self.rng.random()
            if roll < 0.6:
                out += self.message_lifecycle(s)
            elif roll < 0.8:
                out.append(self.inbound(s))
            else:
                out += self.template_history(s)
        return out[:n]
