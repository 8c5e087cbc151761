"""An order-free oracle: the database state a set of unique events must produce, computed independently."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import orjson
import psycopg

RANK = {"queued": 0, "routed": 1, "sent": 2, "failed": 3, "delivered": 4, "read": 5}


@dataclass
class Expected:
    message_events: dict[str, str] = field(default_factory=dict)  # event id -> status
    message_status: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, message) -> event id
    inbound: set[str] = field(default_factory=set)
    template_events: dict[str, str] = field(default_factory=dict)
    template_status: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.message_events) + len(self.inbound) + len(self.template_events)


def _event_id(body: bytes, doc: dict) -> str:  # type: ignore[type-arg]
    return str(doc["id"]) if "id" in doc else hashlib.sha256(body).hexdigest()


def expected_state(bodies: list[bytes], tenant: str = "default") -> Expected:
    exp = Expected()
    best_msg: dict[tuple[str, str], tuple[int, datetime, str]] = {}
    best_tpl: dict[tuple[str, str], tuple[datetime, str]] = {}
    for body in set(bodies):
        doc = orjson.loads(body)
        eid = _event_id(body, doc)
        shape_sent = "field" in doc
        data = doc["payload"] if shape_sent else doc["data"]
        at = datetime.fromisoformat(doc["timestamp"] if shape_sent else doc["created_at"])
        kind = doc["field"] if shape_sent else doc["event"]["type"]
        sub = doc.get("sub_type")
        if (
            kind in ("message", "message.status.updated")
            and sub != "message.received"
            and (shape_sent or kind == "message.status.updated")
        ):
            status = (sub.removeprefix("message.") if shape_sent else data["message_status"]).lower()
            exp.message_events[eid] = status
            k = (tenant, data["message_id"])
            cand = (RANK[status], at, eid)
            if k not in best_msg or cand > best_msg[k]:
                best_msg[k] = cand
        elif kind in ("templates", "template.approval.updated"):
            exp.template_events[eid] = data["status"].lower()
            k = (tenant, data["template_id"])
            cand2 = (at, eid)
            if k not in best_tpl or cand2 > best_tpl[k]:
                best_tpl[k] = cand2
        else:
            exp.inbound.add(eid)
    exp.message_status = {k: v[2] for k, v in best_msg.items()}
    exp.template_status = {k: v[1] for k, v in best_tpl.items()}
    return exp


def actual_state(db_url: str) -> Expected:
    got = Expected()
    with psycopg.connect(db_url) as c:
        got.message_events = dict(c.execute("SELECT event_id, status FROM message_events").fetchall())
        got.message_status = {
            (t, m): e
            for t, m, e in c.execute("SELECT tenant, message_id, event_id FROM message_status").fetchall()
        }
        got.inbound = {r[0] for r in c.execute("SELECT event_id FROM inbound_messages").fetchall()}
        got.template_events = dict(c.execute("SELECT event_id, status FROM template_events").fetchall())
        got.template_status = {
            (t, m): e
            for t, m, e in c.execute("SELECT tenant, template_id, event_id FROM template_status").fetchall()
        }
    return got


def row_count(db_url: str) -> int:
    with psycopg.connect(db_url, connect_timeout=3) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM message_events) + (SELECT count(*) FROM inbound_messages)"
            " + (SELECT count(*) FROM template_events)"
        ).fetchone()
        return int(row[0]) if row else 0
