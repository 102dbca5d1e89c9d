"""The one typed adapter around aiokafka (an untyped library): client settings from
:class:`~service.config.Settings`, topic creation, and small producer/consumer wrappers.

Everything else in killswitch talks to Kafka through this module, so security options
(SASL/TLS), latency tuning and topic layout are decided in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from service.config import Settings

log = logging.getLogger("killswitch.kafka")


def common_kwargs(settings: Settings, client_id: str) -> dict[str, Any]:
    """Connection and security options shared by producers, consumers and admin."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        kwargs["sasl_plain_password"] = password.reveal() if password else ""
    return kwargs


def producer(settings: Settings, client_id: str, **overrides: Any) -> AIOKafkaProducer:
    # linger 0 + acks=all: a revocation or usage event leaves at once and is durable
    # when acknowledged. (tansu has no idempotent producer; see docs/kafka.md.)
    options = {"acks": "all", "linger_ms": 0, "request_timeout_ms": 10_000}
    options.update(overrides)
    return AIOKafkaProducer(**common_kwargs(settings, client_id), **options)


def consumer(
    settings: Settings, *topics: str, client_id: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **common_kwargs(settings, client_id), **options)


def cancellation_leaked() -> bool:
    """Whether a ``CancelledError`` just caught was *not* asked for.

    aiokafka cancels futures of its own when a broker connection drops, and such a
    ``CancelledError`` can surface in the caller's ``getmany``/``position`` even though
    nobody cancelled the caller's task (seen on Apache Kafka restarts). A long-running
    loop that re-raised it would die quietly — a guard stale for good, an outbox that
    never drains. Loops call this: True means "treat it as a broker error and retry";
    False means our own task is being cancelled (``Task.cancelling()``) and must stop.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


async def partitions_of(client: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of ``topic`` (empty if it does not exist), asked of the broker.

    ``AIOKafkaConsumer.topics()`` fetches fresh metadata but ``partitions_for_topic`` reads
    the client's own cache, which holds only subscribed topics: on Apache Kafka a
    group-less consumer never sees the partitions that way. Read them from the fetched
    metadata instead.
    """
    return await _listed_partitions(client._client, topic)


async def listed_partitions(producer: AIOKafkaProducer, topic: str) -> set[int]:
    """:func:`partitions_of` for a producer: what fresh broker metadata lists for ``topic``.

    A broker that restarted empty may still acknowledge writes to a topic it does not
    list; the outbox asks this before it deletes a row it published.
    """
    return await _listed_partitions(producer.client, topic)


async def _listed_partitions(client: Any, topic: str) -> set[int]:
    cluster = await client.fetch_all_metadata()
    parts: set[int] | None = cluster.partitions_for_topic(topic)
    return set(parts or ())


async def behind(consumer: AIOKafkaConsumer, partitions: Iterable[Any]) -> list[Any]:
    """The partitions whose position is below the high-water mark of their last fetch.

    A partition not fetched yet counts as behind. The mark comes from fetch responses,
    never from ``end_offsets`` (``ListOffsets``): tansu answers that with a count of
    record batches, not records, so "caught up to end_offsets" can be declared early.
    """
    late = []
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            late.append(tp)
    return late


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    n = settings.kafka_partitions
    return [
        TopicSpec(settings.kafka_usage_topic, n, {}),
        TopicSpec(settings.kafka_tasks_topic, n, {}),
        # One partition: guards replay revocations in the order they were committed.
        TopicSpec(settings.kafka_revocations_topic, 1, {"cleanup.policy": "compact"}),
        TopicSpec(settings.kafka_alerts_topic, n, {}),
        TopicSpec(settings.kafka_dlq_topic, n, {}),
    ]


async def ensure_topics(settings: Settings, specs: Iterable[TopicSpec] | None = None) -> None:
    """Create the killswitch topics that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(**common_kwargs(settings, "killswitch-admin"))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.kafka_replication_factor,
                topic_configs=spec.config,
            )
            for spec in (specs if specs is not None else topic_specs(settings))
            if spec.name not in existing
        ]
        if missing:
            # Another process may win the race; the topic is there either way.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()
