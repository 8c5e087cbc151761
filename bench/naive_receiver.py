"""The naive receiver the ingress bench compares against: what an integration guide's webhook endpoint looks
like when written the obvious way. Flask under gunicorn (sync workers, one request at a time each), the
signature checked with `hmac`, and every event INSERTed into PostgreSQL and committed before the answer.

    SENTPIPE_DATABASE_URL=... NAIVE_WEBHOOK_SECRET=whsec_... \\
        gunicorn -w 2 -b 127.0.0.1:8090 bench.naive_receiver:app

It is fair, not crippled: one connection per worker process kept open (not one per request), the HMAC key
decoded once, a constant-time compare, `ON CONFLICT DO NOTHING` so Sent's retries do not pile up. The table
is created on first use (`NAIVE_TABLE`, default `naive_webhook_events`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

import psycopg
from flask import Flask, Response, request

app = Flask(__name__)

_SECRET = os.environ.get("NAIVE_WEBHOOK_SECRET", "")
_KEY = base64.b64decode(_SECRET.removeprefix("whsec_")) if _SECRET.startswith("whsec_") else _SECRET.encode()
_TOLERANCE_S = int(os.environ.get("NAIVE_TOLERANCE_S", "300"))
_TABLE = os.environ.get("NAIVE_TABLE", "naive_webhook_events")
_conn: psycopg.Connection[Any] | None = None


def _db() -> psycopg.Connection[Any]:
    """This worker's connection (opened after gunicorn forked it), the table created on first use."""
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(os.environ["SENTPIPE_DATABASE_URL"])
        _conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
            " event_id text PRIMARY KEY, event_type text, received_at timestamptz NOT NULL DEFAULT now(),"
            " payload jsonb NOT NULL)"
        )
        _conn.commit()
    return _conn


def _answer(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


@app.post("/webhooks/sent")
def receive() -> Response:
    webhook_id = request.headers.get("x-webhook-id", "")
    timestamp = request.headers.get("x-webhook-timestamp", "")
    signature = request.headers.get("x-webhook-signature", "")
    body = request.get_data()
    if not (webhook_id and timestamp and signature):
        return _answer(401, {"error": "missing_headers"})
    try:
        if abs(time.time() - int(timestamp)) > _TOLERANCE_S:
            return _answer(401, {"error": "stale_timestamp"})
    except ValueError:
        return _answer(401, {"error": "invalid_timestamp"})
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(_KEY, signed, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1)[1] for part in signature.split() if part.startswith("v1,")]
    if not any(hmac.compare_digest(expected, o) for o in offered):
        return _answer(401, {"error": "invalid_signature"})
    try:
        event = json.loads(body)
    except ValueError:
        return _answer(400, {"error": "not_json"})
    if not isinstance(event, dict):
        return _answer(400, {"error": "not_an_object"})
    event_type = event.get("sub_type") or (event.get("event") or {}).get("type") or event.get("field")
    conn = _db()
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {_TABLE} (event_id, event_type, payload) VALUES (%s, %s, %s)"
            " ON CONFLICT (event_id) DO NOTHING",
            (webhook_id, event_type, body.decode()),
        )
    conn.commit()
    return _answer(200, {"status": "accepted"})


@app.get("/healthz")
def healthz() -> Response:
    _db()
    return _answer(200, {"status": "ok"})
