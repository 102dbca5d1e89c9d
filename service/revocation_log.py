"""The revocation topic, kept whole: the database is the truth, the topic is its copy.

Guards (``service.sdk.revocations.KafkaRevocationFeed``) trust the revocation topic only
as far as the service vouches for it, with a :class:`~service.kernel.events.FeedCheckpoint`
("everything that can still matter is in the log up to here"). This module writes those
checkpoints and decides when the topic must be rebuilt:

* **new or empty** — no checkpoint of ours is stored in the database (first start), or
  the one stored is no longer at its offset;
* **reset** — the broker restarted empty or the topic was recreated: the topic is not
  listed, its high-water mark fell below what we know was written, an acknowledgement
  came back with an offset lower than one already acknowledged, or the record at the
  stored checkpoint offset is not that checkpoint.

A rebuild republishes from the database every revocation that can still deny a live
credential (``repository.revocations_that_matter``: credential lifetime plus leeway),
then writes a checkpoint with a fresh epoch and stores where it landed. Running guards
that see the new epoch replay from the start; fresh guards become ready only once they
have seen it. Republishing what a log already holds is harmless: applying a revocation
is idempotent.

The stored checkpoint is shared through the database, so service replicas agree on
which build of the topic is current; two replicas rebuilding at once only make guards
replay twice.

It never deletes anything from Kafka and never publishes a revocation the database does
not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from aiokafka.structs import TopicPartition

from service import kafka
from service.config import Settings
from service.kernel.clock import Clock
from service.kernel.events import (
    CHECKPOINT_KEY,
    FeedCheckpoint,
    encoder,
    revocation_key,
    revocation_record_decoder,
)
from service.storage import repository as repo
from service.storage.database import Database

__all__ = ["LogReset", "RevocationLog"]

log = logging.getLogger("killswitch.revocation_log")

_FETCH_TIMEOUT_MS = 2_000


class LogReset(Exception):
    """The revocation topic is not the one the database remembers: rebuild it."""


class RevocationLog:
    """Verifies and, when needed, rebuilds the revocation topic (one partition)."""

    def __init__(self, db: Database, settings: Settings, clock: Clock) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.topic = settings.kafka_revocations_topic
        self.epoch: str | None = None
        self.rebuilds = 0
        self.republished = 0
        """Revocations republished by rebuilds, in all."""
        self.last_reason: str | None = None
        # Highest offset acknowledged (or known written) per partition of the topic.
        self._high: dict[int, int] = {}
        self._checkpoint: tuple[int, int] | None = None  # (partition, offset)
        self._consumer: Any = None

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    # ------------------------------------------------------------------ checks

    def acknowledged(self, partition: int, offset: int) -> None:
        """Record one acknowledged write; raise :class:`LogReset` if offsets went back.

        Offsets in one partition only ever grow, whoever writes: an acknowledgement below
        one already seen means the log under us is a different, newer one.
        """
        high = self._high.get(partition, -1)
        if offset <= high:
            raise LogReset(
                f"broker acknowledged offset {offset} on partition {partition} after {high}"
            )
        self._high[partition] = offset

    async def listed(self, producer: Any) -> bool:
        """Whether fresh broker metadata lists the topic (with a partition 0)."""
        return 0 in await kafka.listed_partitions(producer, self.topic)

    async def verify(self, producer: Any) -> None:
        """Raise :class:`LogReset` unless the topic still holds our stored checkpoint.

        Reads the record at the stored offset every time: the fetch proves it is still
        our checkpoint and brings the partition's high-water mark (``ListOffsets`` is not
        trusted: tansu answers it with a count of batches, not of records).
        """
        if not await self.listed(producer):
            raise LogReset(f"topic {self.topic} is not listed by the broker")
        stored = await repo.get_feed_checkpoint(self.db, self.topic)
        if stored is None:
            raise LogReset("no checkpoint stored for the topic")
        partition, offset = int(stored["partition_id"]), int(stored["record_offset"])
        consumer = await self._reader()
        tp = TopicPartition(self.topic, partition)
        record = await self._read(consumer, tp, offset)
        if record is None:
            raise LogReset(f"no record at the stored checkpoint offset {offset}")
        if not (isinstance(record, FeedCheckpoint) and record.epoch == stored["epoch"]):
            raise LogReset(f"the record at offset {offset} is not checkpoint {stored['epoch']}")
        end = consumer.highwater(tp)
        high = max(self._high.get(partition, -1), offset)
        if end is not None and end <= high:
            raise LogReset(f"high-water mark {end} at or below offset {high} already written")
        self._checkpoint = (partition, offset)
        self.epoch = stored["epoch"]
        if end is not None:
            self._high[partition] = max(self._high.get(partition, -1), end - 1)

    async def _reader(self) -> Any:
        if self._consumer is None:
            consumer = kafka.consumer(
                self.settings,
                client_id="killswitch-revocation-log",
                group_id=None,
                auto_offset_reset="none",
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _read(
        self, consumer: Any, tp: TopicPartition, offset: int
    ) -> FeedCheckpoint | object | None:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        try:
            batch = await consumer.getmany(tp, timeout_ms=_FETCH_TIMEOUT_MS, max_records=1)
        except Exception as exc:  # offset out of range: the record is gone
            log.warning("reading the checkpoint at %s@%d: %s", tp, offset, exc)
            return None
        for record in batch.get(tp, []):
            if record.offset != offset or record.value is None:
                return None  # compacted away or replaced
            try:
                return revocation_record_decoder.decode(record.value)
            except Exception:
                return None
        return None

    # ------------------------------------------------------------------ rebuild

    async def ensure_whole(self, producer: Any) -> None:
        """Verify the topic; rebuild it if it is new, empty or reset."""
        try:
            await self.verify(producer)
        except LogReset as exc:
            await self.rebuild(producer, str(exc))

    async def rebuild(self, producer: Any, reason: str) -> None:
        """Republish what can still matter, then write and store a new checkpoint."""
        await kafka.ensure_topics(self.settings)
        now = self.clock.now()
        through = await repo.max_revocation_seq(self.db)
        events = await repo.revocations_that_matter(self.db, now, self.settings.leeway)
        self._high.clear()
        self._checkpoint = None
        sends = [
            await producer.send(
                self.topic, value=encoder.encode(event), key=revocation_key(event).encode()
            )
            for event in events
        ]
        for metadata in await asyncio.gather(*sends):
            self._high[metadata.partition] = max(
                self._high.get(metadata.partition, -1), metadata.offset
            )
        epoch = str(uuid.uuid4())
        checkpoint = FeedCheckpoint(
            epoch=epoch, at=now, through_seq=through, republished=len(events)
        )
        metadata = await (
            await producer.send(
                self.topic, value=encoder.encode(checkpoint), key=CHECKPOINT_KEY.encode()
            )
        )
        self.acknowledged(metadata.partition, metadata.offset)
        if not await self.listed(producer):
            raise LogReset(f"topic {self.topic} still not listed after the rebuild")
        await repo.put_feed_checkpoint(
            self.db,
            topic=self.topic,
            epoch=epoch,
            partition=metadata.partition,
            offset=metadata.offset,
            through_seq=through,
            republished=len(events),
            at=now,
        )
        self.epoch = epoch
        self._checkpoint = (metadata.partition, metadata.offset)
        self.rebuilds += 1
        self.republished += len(events)
        self.last_reason = reason
        log.warning(
            "revocation topic %s rebuilt (%s): %d revocations republished, checkpoint %s at %d",
            self.topic,
            reason,
            len(events),
            epoch,
            metadata.offset,
        )
