"""The pipeline bench's reference: a plain confluent-kafka consume loop doing sentpipe's database writes.

One process: consume a batch from the raw topic, normalize with `schemas.routing.route`, write the rows of
`processors.projections.PROJECTIONS` with executemany in one transaction, then commit the offsets. No
routed topics, no changelog, no agents: the floor that sentpipe's architecture is measured against.

`python -m bench.reference --bootstrap ... --topic ... --group ... --database-url ... --lags-out ...`
On SIGTERM it finishes the batch in hand, commits, writes (received-at, lag) samples and exits.
"""

from __future__ import annotations

import argparse
import signal
import time
from array import array
from collections import defaultdict
from pathlib import Path
from types import FrameType

import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError

from sentpipe.processors.projections import PROJECTIONS
from sentpipe.schemas.events import CanonicalEvent, EventType, MalformedEvent
from sentpipe.schemas.routing import header_map, route
from sentpipe.schemas.topics import Topics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic-prefix", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--lags-out", required=True)
    p.add_argument("--batch", type=int, default=500)  # sentpipe's SENTPIPE_BATCH_SIZE default
    p.add_argument("--within", type=float, default=0.1)  # and SENTPIPE_BATCH_WITHIN_S
    p.add_argument("--tenant", default="default")
    args = p.parse_args()

    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    topics = Topics(args.topic_prefix)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 3,
        }
    )
    consumer.subscribe([topics.raw])
    # The dedup table's job, minus its changelog: the database's unique keys remain the backstop.
    seen: set[bytes] = set()
    received_ms, lags = array("q"), array("d")
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        while not stop:
            msgs = consumer.consume(args.batch, args.within)
            if not msgs:
                continue
            by_type: dict[EventType, list[CanonicalEvent]] = defaultdict(list)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        print(f"consume error: {err}", flush=True)
                    continue
                key = msg.key() or b""
                if key and key in seen:
                    continue
                try:
                    routed = route(
                        key or None,
                        msg.value() or b"",
                        header_map(msg.headers()),
                        topics=topics,
                        id_source="auto",
                        default_tenant=args.tenant,
                        record_timestamp_ms=msg.timestamp()[1],
                    )
                except MalformedEvent:
                    continue
                if routed.event is not None:
                    by_type[routed.event.type].append(routed.event)
                if key:
                    seen.add(key)
            with conn.transaction(), conn.cursor() as cur:
                for type_, events in by_type.items():
                    for sql, rows in PROJECTIONS[type_].rows(events):
                        if rows:
                            cur.executemany(sql, rows)
            committed = time.time()
            for events in by_type.values():
                for ev in events:
                    received_ms.append(ev.received_at_ms)
                    lags.append(max(0.0, committed - ev.received_at_ms / 1000))
            consumer.commit(asynchronous=False)
    consumer.close()
    Path(args.lags_out).write_bytes(orjson.dumps({"received_ms": list(received_ms), "lag_s": list(lags)}))


if __name__ == "__main__":
    main()
