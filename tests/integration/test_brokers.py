"""Both real brokers, driven by aiokafka exactly as the service and detector use them.

Each broker is started once per module. Run:
    pytest tests/integration/test_brokers.py                    # both brokers
    pytest tests/integration/test_brokers.py -m "not kafka_apache"   # tansu only
    pytest tests/integration/test_brokers.py -m kafka_apache         # Apache Kafka only
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from service.brokers import (
    DEFAULT_KAFKA_VERSION,
    FAST_CONSUMER,
    BrokerProcess,
    BrokerStartError,
    KafkaJarsError,
    RunningBroker,
    ensure_kafka_jars,
    start_apache_kafka,
    start_tansu,
)

BROKERS = [
    pytest.param("tansu", id="tansu", marks=pytest.mark.tansu),
    pytest.param("apache", id="apache", marks=pytest.mark.kafka_apache),
]


def _start_apache(**kw: Any) -> BrokerProcess:
    try:
        return start_apache_kafka(**kw)
    except KafkaJarsError as e:
        pytest.fail(
            f"Apache Kafka {kw.get('version', DEFAULT_KAFKA_VERSION)} jars could not be "
            f"resolved from Maven Central (needed by the kafka_apache tests; deselect them "
            f"with -m 'not kafka_apache'):\n{e}",
            pytrace=False,
        )


@pytest.fixture(scope="module", params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    b = start_tansu() if request.param == "tansu" else _start_apache()
    with b:
        yield b
    assert not b.running()


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _create(bootstrap: str, *topics: NewTopic) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(list(topics))
        errors = [(t, code, msg) for t, code, msg in resp.topic_errors if code != 0]
        assert not errors, errors
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=0
    )
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _consume(
    consumer: AIOKafkaConsumer, want: int, deadline_s: float = 30
) -> list[tuple[int, bytes, bytes | None]]:
    got: list[tuple[int, bytes, bytes | None]] = []
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        batches = await consumer.getmany(timeout_ms=200)
        for msgs in batches.values():
            got.extend((m.partition, m.key, m.value) for m in msgs)
    return got


def _group_consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_CONSUMER,
    )


async def test_metadata_names_the_broker(broker: BrokerProcess) -> None:
    assert isinstance(broker, RunningBroker)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    [b] = cluster["brokers"]
    assert f"{b['host']}:{b['port']}" == broker.bootstrap
    assert broker.log_path.is_file()


async def test_keyed_messages_round_trip_through_a_group_with_commits(
    broker: BrokerProcess,
) -> None:
    bs = broker.bootstrap
    topic = _topic("usage")
    await _create(bs, NewTopic(topic, 3, 1))
    keys = [f"agent-{i}".encode() for i in range(5)]
    records: list[tuple[bytes, bytes | None]] = [
        (keys[i % 5], f"{i // 5}".encode()) for i in range(40)
    ]
    await _produce(bs, topic, records)

    group = _topic("detector")
    consumer = _group_consumer(bs, topic, group)
    await consumer.start()
    try:
        got = await _consume(consumer, len(records))
        assert len(got) == len(records), got
        per_key: dict[bytes, list[bytes | None]] = defaultdict(list)
        partitions: dict[bytes, set[int]] = defaultdict(set)
        for partition, key, value in got:
            per_key[key].append(value)
            partitions[key].add(partition)
        for key in keys:
            assert per_key[key] == [str(n).encode() for n in range(8)], key  # order per key
            assert len(partitions[key]) == 1  # one key, one partition
        await consumer.commit()
        tps = [TopicPartition(topic, p) for p in range(3)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            assert await consumer.committed(tp) == ends[tp]
    finally:
        await consumer.stop()

    # A new member of the same group resumes from the committed offsets: it reads only
    # what was produced after the commit, although auto_offset_reset is "earliest".
    await _produce(bs, topic, [(keys[0], b"after-commit")])
    consumer = _group_consumer(bs, topic, group)
    await consumer.start()
    try:
        expected = [(partition_of(got, keys[0]), keys[0], b"after-commit")]
        assert await _consume(consumer, 1) == expected
        assert await _consume(consumer, 1, deadline_s=0.5) == []
    finally:
        await consumer.stop()


def partition_of(got: list[tuple[int, bytes, bytes | None]], key: bytes) -> int:
    return next(p for p, k, _ in got if k == key)


async def test_compacted_topic_is_accepted_and_keeps_the_latest_value(
    broker: BrokerProcess,
) -> None:
    bs = broker.bootstrap
    topic = _topic("revocations")
    await _create(bs, NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"}))

    admin = AIOKafkaAdminClient(bootstrap_servers=bs)
    await admin.start()
    try:
        [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        [(error_code, _msg, _type, _name, entries)] = resp.resources
        assert error_code == 0
        configs = {e[0]: e[1] for e in entries}
        assert configs["cleanup.policy"] == "compact"
    finally:
        await admin.close()

    records: list[tuple[bytes, bytes | None]] = [
        (b"task-1", b"v1"),
        (b"task-2", b"v1"),
        (b"task-1", b"v2"),
        (b"task-3", b"v1"),
        (b"task-2", None),  # tombstone
    ]
    await _produce(bs, topic, records)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bs, auto_offset_reset="earliest", **FAST_CONSUMER
    )
    await consumer.start()
    try:
        # compaction may or may not have run: replaying must still give the latest state
        got = await _consume(consumer, len(records), deadline_s=5)
    finally:
        await consumer.stop()
    state: dict[bytes, bytes | None] = {}
    for _p, key, value in got:
        state[key] = value
    state = {k: v for k, v in state.items() if v is not None}
    assert state == {b"task-1": b"v2", b"task-3": b"v1"}


async def test_idempotent_and_transactional_producer(broker: BrokerProcess) -> None:
    """Apache Kafka supports both; tansu does not (InitProducerId fails) — see docs."""
    topic = _topic("outbox")
    await _create(broker.bootstrap, NewTopic(topic, 1, 1))
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap,
        transactional_id=_topic("tx"),
        request_timeout_ms=5000,
    )
    if broker.kind == "tansu":
        try:
            with pytest.raises(KafkaError):
                await asyncio.wait_for(producer.start(), 15)
        finally:
            await producer.stop()
        return
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"committed", key=b"k")
        await producer.begin_transaction()
        await producer.send(topic, b"aborted", key=b"k")
        await producer.abort_transaction()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **FAST_CONSUMER,
    )
    await consumer.start()
    try:
        got = await _consume(consumer, 2, deadline_s=3)
    finally:
        await consumer.stop()
    assert [v for _p, _k, v in got] == [b"committed"]


# --- launcher behaviour -----------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.tansu
def test_tansu_stop_is_idempotent_and_frees_everything() -> None:
    with start_tansu(ready_timeout=10) as b:
        assert b.running()
        assert b.ready_seconds is not None
        assert b.ready_seconds < 10
        log_dir = b.log_path.parent
        b.stop()
        b.stop()
        assert not b.running()
    b.stop()
    assert _port_free(b.port)
    assert not log_dir.exists()


@pytest.mark.tansu
async def test_tansu_stops_at_once_with_clients_connected() -> None:
    """On SIGTERM tansu waits ~5 s for connected clients; stop() sends SIGINT (see tansu.py).

    docs/kafka.md quotes the figure: a few ms, and tansu exits by itself (code 0), no SIGKILL.
    """
    with start_tansu(ready_timeout=10) as b:
        topic = _topic("stop")
        producer = AIOKafkaProducer(bootstrap_servers=b.bootstrap)
        await producer.start()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=b.bootstrap, auto_offset_reset="earliest", **FAST_CONSUMER
        )
        try:
            await producer.send_and_wait(topic, b"x")
            await consumer.start()
            await consumer.getmany(timeout_ms=1000)  # a fetch in flight, as a guard has
            started = time.perf_counter()
            await asyncio.to_thread(b.stop)
            took = time.perf_counter() - started
        finally:
            for client in (consumer, producer):
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(client.stop(), 2)
    assert b.proc.returncode == 0, f"tansu did not exit by itself ({b.proc.returncode})"
    assert took < 0.5, f"stopping tansu with clients connected took {took:.3f} s"


@pytest.mark.tansu
def test_port_in_use_is_refused_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"port 127.0.0.1:{port} is not free"):
            start_tansu(port=port)


@pytest.mark.tansu
def test_broker_that_exits_names_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KS_TANSU_BIN", str(fake))
    with pytest.raises(BrokerStartError) as info:
        start_tansu(log_dir=tmp_path / "logs")
    msg = str(info.value)
    assert "exited with code 3" in msg
    assert str(tmp_path / "logs" / "tansu.log") in msg
    assert "boom: cannot start" in msg


@pytest.mark.tansu
def test_broker_that_never_gets_ready_times_out_and_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "tansu"
    pidfile = tmp_path / "pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KS_TANSU_BIN", str(fake))
    t0 = time.monotonic()
    with pytest.raises(BrokerStartError, match=r"did not become ready in 0\.5s.*; see "):
        start_tansu(ready_timeout=0.5, log_dir=tmp_path)
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.kafka_apache
def test_kafka_jars_are_cached() -> None:
    t0 = time.monotonic()
    libs = ensure_kafka_jars(DEFAULT_KAFKA_VERSION)
    assert (libs / f"kafka_2.13-{DEFAULT_KAFKA_VERSION}.jar").is_file()
    assert (libs / f"kafka-clients-{DEFAULT_KAFKA_VERSION}.jar").is_file()
    libs2 = ensure_kafka_jars(DEFAULT_KAFKA_VERSION)
    assert libs2 == libs
    assert time.monotonic() - t0 < 120


@pytest.mark.kafka_apache
def test_unknown_kafka_version_fails_with_mavens_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KS_KAFKA_LIBS", str(tmp_path / "libs"))
    with pytest.raises(KafkaJarsError, match=r"could not resolve .*0\.0\.1-nope.*see "):
        ensure_kafka_jars("0.0.1-nope")


@pytest.mark.kafka_apache
async def test_apache_work_dir_survives_a_restart(tmp_path: Path) -> None:
    topic = _topic("durable")
    with _start_apache(work_dir=tmp_path / "kafka") as b:
        await _create(b.bootstrap, NewTopic(topic, 1, 1))
        await _produce(b.bootstrap, topic, [(b"k", b"kept")])
    assert (tmp_path / "kafka" / "data" / "meta.properties").is_file()
    with _start_apache(work_dir=tmp_path / "kafka") as b:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=b.bootstrap, auto_offset_reset="earliest", **FAST_CONSUMER
        )
        await consumer.start()
        try:
            assert await _consume(consumer, 1) == [(0, b"k", b"kept")]
        finally:
            await consumer.stop()
