"""Restore the dedup table from its changelog with librdkafka, before Faust starts.

Faust recovers a table by consuming its changelog through aiokafka, one Python event per record: about
5,000 ids/s on the bench machine (README "Performance"), so a router with a million ids in its window
cannot route for three minutes after every cold start. This reads the changelog in batches of thousands
and writes them into the table's store:

- RocksDB: each partition's file with write batches, in exactly the layout Faust's RocksDB store uses (same
  file per partition, same options, raw keys and values, the same persisted-offset key);
- memory (processors/store.py): straight into the store's dict, with the offsets it reports to Faust.

Faust then finds every partition up to date and recovers only what was written since.

Every partition is restored, not only the ones this process will be assigned (unknown before it joins the
group): a second router restores partitions it may not serve, as a standby replica would. A warm restart
reads only what was added to the changelog since the files were last written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from sentpipe.kafka import BrokerRefused, BrokerUnavailable, client_config
from sentpipe.processors.store import DedupMemoryStore
from sentpipe.processors.topics import changelog_topic
from sentpipe.settings import Settings

log = logging.getLogger("sentpipe.processors.restore")

BATCH = 10_000  # records taken from librdkafka per call, and at most written per RocksDB write batch
IDLE_TIMEOUT_S = 30.0  # no record for this long while behind the end: the broker is gone
_NOT_AUTHORIZED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED})


@dataclass(frozen=True)
class Restored:
    records: int
    partitions: int
    seconds: float


def restore_dedup_table(
    settings: Settings, store: Any, progress: Callable[[int, int], None] | None = None
) -> Restored | None:
    """Bring `store` (the dedup table's Faust store) up to the changelog's end.

    None when the store is neither sentpipe's memory store nor Faust's RocksDB store on rocksdict (nothing
    to do: Faust recovers it). BrokerUnavailable when the changelog cannot be read."""
    target: _Target
    if isinstance(store, DedupMemoryStore):
        target = _Memory(store)
    else:
        options = getattr(store, "rocksdb_options", None)
        if options is None or not getattr(options, "use_rocksdict", False):
            return None
        target = _Rocks(store, options)

    started = time.monotonic()
    topic = changelog_topic(settings)
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": f"{settings.app_id}-restore",  # required by librdkafka; nothing is committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "log_level": 3,
        }
    )
    try:
        try:
            md = consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the dedup changelog {topic}: {exc}") from None
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            # Only a changelog the broker says does not exist makes the files stale. A metadata error that
            # passes (a leader being elected) or an ACL's refusal says nothing of them: emptied then, the
            # marks were read again by Faust's recovery, one Python event each.
            if meta is None or (
                meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            ):
                for partition in range(settings.raw_partitions):
                    _forget_if_ahead(target, topic, partition, 0)
            return Restored(0, 0, time.monotonic() - started)  # no changelog yet: nothing to restore
        ends: dict[int, int] = {}
        assignment = []
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            stored = _forget_if_ahead(target, topic, p, high)
            start = stored + 1 if stored is not None else OFFSET_BEGINNING
            begin = low if start == OFFSET_BEGINNING else max(start, low)
            if begin < high:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, begin))
        total = sum(ends[tp.partition] - tp.offset for tp in assignment)
        done = 0
        if assignment:
            log.info(
                "restoring the dedup table from %s: %d records in %d partitions",
                topic,
                total,
                len(assignment),
            )
            consumer.assign(assignment)
        last_record = time.monotonic()
        last_error: KafkaError | None = None
        while ends:
            msgs = consumer.consume(BATCH, timeout=1.0)
            batches: dict[int, list[tuple[bytes, bytes | None]]] = {}
            last: dict[int, int] = {}
            read = 0
            for msg in msgs:
                if (error := msg.error()) is not None:
                    last_error = _checked(error, topic, settings.kafka_bootstrap)
                    continue
                last_record = time.monotonic()
                read += 1
                p, key = msg.partition(), msg.key()
                if p not in ends or key is None:  # a partition already complete, or not a table record
                    continue
                batch = batches.get(p)
                if batch is None:
                    batch = batches[p] = []
                batch.append((key, msg.value()))
                last[p] = msg.offset() or 0
            # Only records reset the clock: a fetch error returned on every call (a partition without a
            # leader) kept the restore waiting forever, without a line.
            if time.monotonic() - last_record > IDLE_TIMEOUT_S:
                why = f": {last_error.str()}" if last_error is not None else ""
                raise BrokerUnavailable(
                    f"the dedup changelog {topic} stopped arriving during restore "
                    f"(nothing for {IDLE_TIMEOUT_S:g} s){why}"
                )
            if not msgs:
                continue
            for p, batch in batches.items():
                target.write(p, batch, last[p])
                if last[p] + 1 >= ends[p]:
                    ends.pop(p, None)
            if ends:
                # Compaction can leave the last offsets of a partition empty: its position tells it is done.
                for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
            done += read
            if progress is not None:
                progress(min(done, total), total)
        seconds = time.monotonic() - started
        if total:
            log.info(
                "dedup table restored",
                extra={
                    "records": total,
                    "seconds": round(seconds, 2),
                    "per_s": int(total / max(seconds, 0.001)),
                },
            )
        return Restored(total, len(meta.partitions), seconds)
    finally:
        target.close()
        consumer.close()


def _forget_if_ahead(target: _Target, topic: str, partition: int, high: int) -> int | None:
    """The offset the store holds the changelog partition up to; None, with the partition emptied, when that
    is at or past the changelog's end (`high`).

    Such a store was filled from another changelog of the same name: the topic deleted and created again,
    or another cluster, with the RocksDB volume kept. Taken as current, the restore read none of this
    changelog's marks and Faust's recovery refused the partition (its persisted offset past the highwater)."""
    stored = target.offset(partition)
    if stored is None or stored < high:
        return stored
    log.warning(
        "the dedup table's store for %s[%d] holds offsets up to %d but the changelog ends at %d "
        "(the topic was recreated, or this is another cluster): restoring that partition from the "
        "beginning of the changelog",
        topic,
        partition,
        stored,
        high,
    )
    target.forget(partition)
    return None


def _checked(error: KafkaError, topic: str, bootstrap: str) -> KafkaError:
    """A consumer error that waiting cannot cure, raised at once; any other, returned to be named later."""
    if error.fatal():
        raise KafkaException(error)
    if error.code() in _NOT_AUTHORIZED:
        raise BrokerRefused(
            f"Kafka at {bootstrap} refused to let the worker read the dedup changelog {topic}: {error.str()} "
            "(an ACL must grant READ on the topic)"
        )
    return error


class _Target:
    """Where restored records go: the last offset applied per partition, and writes up to an offset."""

    def offset(self, partition: int) -> int | None:
        raise NotImplementedError

    def write(self, partition: int, records: list[tuple[bytes, bytes | None]], last: int) -> None:
        raise NotImplementedError

    def forget(self, partition: int) -> None:
        """Empty the partition: no records, no offset."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Memory(_Target):
    def __init__(self, store: DedupMemoryStore) -> None:
        self.store = store

    def offset(self, partition: int) -> int | None:
        return self.store.restored_offset(partition)

    def write(self, partition: int, records: list[tuple[bytes, bytes | None]], last: int) -> None:
        self.store.restore_batch(partition, records, last)

    def forget(self, partition: int) -> None:
        self.store.forget_partition(partition)


class StoreUnusable(Exception):
    """RocksDB refused the dedup table's files for a reason of their disk's (full, or locked by another
    process): the start ends with one line naming the file."""


def _named(path: Any, exc: Exception) -> str:
    # rocksdict raises Exception with RocksDB's status, which does not always name the file: "error:
    # Exception: No space left on device (os error 28)" left the user to guess which disk.
    return f"the dedup table's RocksDB file {path} (under SENTPIPE_DATA_DIR): {' '.join(str(exc).split())}"


class _Rocks(_Target):
    """Faust's RocksDB store's files, written as Faust would (rocksdict, raw mode)."""

    def __init__(self, store: Any, options: Any) -> None:
        self.store, self.options = store, options
        self.dbs: dict[int, Any] = {}

    def _db(self, partition: int) -> Any:
        db = self.dbs.get(partition)
        if db is None:
            path = self.store.partition_path(partition)
            try:
                db = self.options.open(path)
            except Exception as exc:  # rocksdict raises Exception itself, its message naming the status
                # A file RocksDB finds corrupt (a deleted or damaged file of the partition's) ended every
                # start with that error until someone deleted the directory by hand. The changelog holds
                # every mark: the partition is rebuilt from it. Anything else (disk full, the LOCK held by
                # another process) is no fault of the file's, and is raised as it is.
                if not str(exc).startswith("Corruption"):
                    raise StoreUnusable(_named(path, exc)) from None
                log.warning(
                    "the dedup table's RocksDB file %s cannot be opened (%s): restoring partition %d "
                    "from the beginning of the changelog",
                    path,
                    " ".join(str(exc).split()),
                    partition,
                )
                self.forget(partition)
                db = self.options.open(path)
            self.dbs[partition] = db
        return db

    def offset(self, partition: int) -> int | None:
        stored = self._db(partition).get(self.store.offset_key)
        return int(stored) if stored is not None else None

    def write(self, partition: int, records: list[tuple[bytes, bytes | None]], last: int) -> None:
        import rocksdict

        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        # The offset goes in the same atomic write as the records it covers.
        wb.put(self.store.offset_key, str(last).encode())
        try:
            self._db(partition).write(wb)
        except StoreUnusable:
            raise
        except Exception as exc:  # rocksdict's own: a full disk, say
            raise StoreUnusable(_named(self.store.partition_path(partition), exc)) from None

    def forget(self, partition: int) -> None:
        import rocksdict

        db = self.dbs.pop(partition, None)
        if db is not None:
            db.close()
        rocksdict.Rdict.destroy(str(self.store.partition_path(partition)))

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()
