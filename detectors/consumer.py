"""The detector's consumer loop: usage events in, decisions out, offsets committed last.

One turn of the loop::

    drain task/revocation facts  ->  getmany(usage)  ->  decode (typed; bad -> DLQ)
      ->  look up tasks nobody told us about  ->  count + rules  ->  act (revoke, alert)
      ->  wait until every action is durable  ->  hand the batch's offsets to the committer

Offsets are committed only after the batch's revocations are acknowledged by the service
and its alerts and dead letters by Kafka, so a crash anywhere before the commit means
redelivery, never loss (at-least-once). Redelivery is harmless because every action is
idempotent: revocations carry ``<rule id>:<task id>`` as idempotency key, alert ids are
derived from rule, task and event.

The commit runs in the background so that the next fetch does not wait for it: at most
one commit is in flight, commits are coalesced to one per ``_COMMIT_EVERY``, and what is
durable is committed before partitions are revoked and before the consumer stops.

Facts (tasks topic, revocations topic) are read by a second, group-less consumer that
replays both topics from the beginning before the detector reports ready, then follows
them. The usage consumer is a consumer group; a rebalance waits for the batch in flight,
then drops the moved partitions' usage state (detectors/state.py).

This module wires things together; it decides nothing (rules.py) and talks to the
service and Kafka only through actions.py and service/kafka.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Final

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from threadpoolctl import threadpool_limits

from detectors.actions import (
    Abandoned,
    Actions,
    RevokeOutcome,
    ServiceClient,
    StopGate,
    retrying,
)
from detectors.metrics import DetectorMetrics, HealthServer
from detectors.models import ModelStage, load_artifact
from detectors.rules import Finding, Thresholds, evaluate
from detectors.state import Store, TaskState
from service import kafka
from service.config import Settings
from service.kernel.clock import Clock, SystemClock
from service.kernel.events import (
    FeedCheckpoint,
    RevocationEvent,
    TaskEvent,
    UsageEvent,
    decoder,
)

__all__ = ["Detector", "run_detector"]

log = logging.getLogger("killswitch.detector")

_LOOKUP_CONCURRENCY: Final = 16
_SWEEP_EVERY: Final = 5.0
_LIVE_WITHIN: Final = 30.0
_COMMIT_EVERY: Final = 0.05

Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


def _tag(event: object) -> str:
    config = getattr(event, "__struct_config__", None)
    return str(getattr(config, "tag", type(event).__name__))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, detector: Detector) -> None:
        self._detector = detector

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # The batch in flight finishes and commits first; its partitions are still ours.
        async with self._detector.batch_lock:
            await self._detector.flush_commits()
            parts = {tp.partition for tp in revoked}
            self._detector.store.drop_partitions(parts)
            for tp in revoked:
                self._detector.processed.pop(tp, None)
                with contextlib.suppress(KeyError):
                    self._detector.metrics.lag.remove(str(tp.partition))
            if parts:
                log.info("partitions revoked: %s", sorted(parts))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = {tp.partition for tp in assigned}
        # Whatever we held for these partitions before is stale: count afresh.
        self._detector.store.drop_partitions(parts)
        self._detector.assigned_once = True
        log.info("partitions assigned: %s", sorted(parts))


class Detector:
    """One detector instance. Build it, then ``await run(stop, ready)``."""

    def __init__(
        self,
        settings: Settings,
        *,
        service_url: str,
        token: str,
        clock: Clock | None = None,
    ) -> None:
        if not service_url:
            raise ValueError("the detector needs the service URL (revocations go through it)")
        if not settings.kafka_bootstrap:
            raise ValueError("the detector needs Kafka (KS_KAFKA_BOOTSTRAP)")
        self.settings = settings
        self.service_url = service_url
        self._token = token
        self.clock = clock or SystemClock()
        self.metrics = DetectorMetrics()
        self.store = Store(denied_burst=settings.detector_denied_burst)
        self.thresholds = Thresholds(
            rate_burst=settings.detector_rate_burst,
            denied_burst=settings.detector_denied_burst,
            denied_window=float(settings.detector_denied_window_s),
            leeway=float(settings.leeway),
        )
        self.model: ModelStage | None = None
        """The learned detector (KS_DETECTOR_MODEL); None = rules only."""
        if settings.detector_model:
            # A missing or mismatched artifact is a configuration error: refuse to start.
            artifact = load_artifact(settings.detector_model)
            # One detector, one core: BLAS threads only contend on micro-batches this small.
            threadpool_limits(1)
            self.model = ModelStage(
                artifact,
                batch_events=settings.detector_model_batch,
                alert_level=settings.detector_model_alert or None,
                revoke_level=settings.detector_model_revoke or None,
                agent_type_pattern=settings.detector_agent_type_pattern or None,
            )
            log.info("model %s loaded from %s", artifact.model_id, settings.detector_model)
        self.batch_lock = asyncio.Lock()
        self.processed: dict[TopicPartition, int] = {}
        """Next offset per partition whose batch is durable and committed (tests wait on it)."""
        self._durable: dict[TopicPartition, int] = {}
        """Next offset per partition whose batch is durable, not yet handed to a commit."""
        self._committer: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._last_commit = 0.0
        self.assigned_once = False
        self.caught_up = False
        self.metrics_port: int | None = None
        self._beat = time.monotonic()
        self._stop = asyncio.Event()

    # ---------------------------------------------------------------- probes

    def live(self) -> bool:
        return time.monotonic() - self._beat < _LIVE_WITHIN

    def ready(self) -> bool:
        return self.caught_up and self.assigned_once and not self._stop.is_set()

    # ---------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        self._stop = stop
        settings = self.settings
        gate = StopGate(stop, float(settings.detector_shutdown_grace_s))
        service = ServiceClient(self.service_url, self._token)
        producer = kafka.producer(settings, "killswitch-detector")
        facts = kafka.consumer(
            settings,
            settings.kafka_tasks_topic,
            settings.kafka_revocations_topic,
            client_id="killswitch-detector-facts",
            group_id=None,
        )
        usage = kafka.consumer(
            settings,
            client_id="killswitch-detector",
            group_id=settings.detector_group_id,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        health = HealthServer(
            self.metrics,
            live=self.live,
            ready=self.ready,
            host=settings.detector_metrics_host,
            port=settings.detector_metrics_port,
        )
        actions = Actions(
            producer=producer,
            service=service,
            alerts_topic=settings.kafka_alerts_topic,
            dlq_topic=settings.kafka_dlq_topic,
            metrics=self.metrics,
            clock=self.clock,
            gate=gate,
        )
        started: list[Any] = []
        try:
            await health.start()
            self.metrics_port = health.port
            await kafka.ensure_topics(settings)
            await producer.start()
            started.append(producer)
            await facts.start()
            started.append(facts)
            await self._catch_up(facts, stop)
            usage.subscribe([settings.kafka_usage_topic], listener=_Rebalance(self))
            await usage.start()
            started.append(usage)
            await self._loop(usage, facts, actions, service, gate, stop, ready)
        except Abandoned as exc:
            log.warning("stopping with a batch not committed (it will be redelivered): %s", exc)
        finally:
            # Durable batches are committed while the consumer is still in the group.
            try:
                await asyncio.wait_for(
                    self.flush_commits(), float(settings.detector_shutdown_grace_s)
                )
            except Exception as exc:  # stopping anyway: the rest is redelivered
                log.warning("stopping with offsets not committed (redelivered): %r", exc)
            # Consumer first (leaves the group, so a peer takes over quickly), then the rest.
            for client in reversed(started):
                with contextlib.suppress(Exception):
                    await client.stop()
            await service.aclose()
            await health.close()
            log.info("detector stopped")

    async def _loop(
        self,
        usage: AIOKafkaConsumer,
        facts: AIOKafkaConsumer,
        actions: Actions,
        service: ServiceClient,
        gate: StopGate,
        stop: asyncio.Event,
        ready: asyncio.Event | None,
    ) -> None:
        settings = self.settings
        last_sweep = time.monotonic()
        while not stop.is_set():
            self._beat = time.monotonic()
            await self._drain_facts(facts, timeout_ms=0)
            try:
                batch: Batch = await usage.getmany(
                    timeout_ms=settings.detector_poll_ms, max_records=settings.detector_max_batch
                )
            except asyncio.CancelledError:
                if not kafka.cancellation_leaked():
                    raise
                # aiokafka cancelled its own fetch when a broker connection dropped: the
                # consumer reconnects by itself; nothing was handed to us, nothing lost.
                log.warning("usage fetch interrupted by a dropped broker connection")
                continue
            if batch:
                await self._handle(batch, usage, actions, service, gate)
            if ready is not None and not ready.is_set() and self.ready():
                ready.set()
                log.info("detector ready")
            if self._beat - last_sweep > _SWEEP_EVERY:
                last_sweep = self._beat
                self._housekeeping(usage)

    def _housekeeping(self, usage: AIOKafkaConsumer) -> None:
        evicted = self.store.sweep(
            self.clock.now(),
            grace=float(self.settings.detector_task_grace_s),
            max_tasks=self.settings.detector_max_tasks,
        )
        if evicted:
            log.debug("evicted %d tasks", evicted)
        self.metrics.tasks.set(len(self.store.tasks))
        self._update_lag(usage)

    def _update_lag(self, usage: AIOKafkaConsumer) -> None:
        for tp in usage.assignment():
            highwater = usage.highwater(tp)
            position = self.processed.get(tp)
            if highwater is not None and position is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, highwater - position))

    # ---------------------------------------------------------------- facts

    async def _catch_up(self, facts: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Replay the tasks and revocations topics up to their ends as of now."""
        t0 = time.monotonic()
        while not facts.assignment() and not stop.is_set():
            await self._drain_facts(facts, timeout_ms=50)
        assignment = list(facts.assignment())
        applied = 0
        while not stop.is_set():
            applied += await self._drain_facts(facts, timeout_ms=100)
            if not await kafka.behind(facts, assignment):
                break
        self.caught_up = True
        log.info(
            "replayed %d task/revocation facts in %.2fs (%d tasks known)",
            applied,
            time.monotonic() - t0,
            len(self.store.tasks),
        )

    async def _drain_facts(self, facts: AIOKafkaConsumer, *, timeout_ms: int) -> int:
        try:
            batch: Batch = await facts.getmany(timeout_ms=timeout_ms)
        except asyncio.CancelledError:
            if not kafka.cancellation_leaked():
                raise
            log.warning("facts fetch interrupted by a dropped broker connection")
            return 0
        applied = 0
        for records in batch.values():
            for record in records:
                try:
                    event = decoder.decode(record.value or b"")
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning(
                        "ignoring undecodable fact %s/%d@%d: %s",
                        record.topic,
                        record.partition,
                        record.offset,
                        exc,
                    )
                    continue
                match event:
                    case TaskEvent():
                        self.store.apply_task_event(event)
                        applied += 1
                    case RevocationEvent():
                        self.store.apply_revocation(event)
                        applied += 1
                    case FeedCheckpoint():
                        pass  # the service vouching for the revocation topic: no fact
                    case _:
                        log.warning("ignoring a %s event on %s", _tag(event), record.topic)
        return applied

    # ---------------------------------------------------------------- one batch

    async def _handle(
        self,
        batch: Batch,
        usage: AIOKafkaConsumer,
        actions: Actions,
        service: ServiceClient,
        gate: StopGate,
    ) -> None:
        async with self.batch_lock:
            t0 = time.perf_counter()
            now = self.clock.now()
            pending: list[Coroutine[Any, Any, RevokeOutcome | None]] = []
            events: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes], UsageEvent]] = []
            for tp, records in batch.items():
                for record in records:
                    reason = None
                    try:
                        event = decoder.decode(record.value or b"")
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        reason = f"undecodable: {exc}"
                    else:
                        if isinstance(event, UsageEvent):
                            events.append((tp, record, event))
                        else:
                            reason = f"a {_tag(event)} event on the usage topic"
                    if reason is not None:
                        pending.append(self._dead_letter(actions, record, reason))
            await self._lookups(events, service, gate, now)
            revoking: dict[str, Finding] = {}
            findings: list[tuple[Finding, TaskState]] = []
            model = self.model
            for tp, record, event in events:
                try:
                    task, agent = self.store.observe(event, tp.partition, now)
                    for finding in evaluate(event, task, agent, self.thresholds):
                        findings.append((finding, task))
                    # Features per event (cheap); scoring per micro-batch, never per event.
                    if model is not None and model.add(event, task, agent):
                        findings.extend(self._score(model))
                except Exception as exc:  # a bug must not stop the detector: keep the input
                    log.exception("detector error on %s", event.event_id)
                    pending.append(
                        self._dead_letter(
                            actions, record, f"detector error: {type(exc).__name__}: {exc}"
                        )
                    )
            if model is not None:
                # The Kafka batch ends the micro-batch: its model decisions are made (and
                # durable) before its offsets are committed, like the rules'.
                findings.extend(self._score(model))
            for finding, task in findings:
                self.metrics.decisions.labels(
                    rule=finding.rule.id, action=finding.rule.action
                ).inc()
                skip: str | None = None
                if finding.rule.action == "revoke":
                    first = revoking.setdefault(finding.task_id, finding)
                    if first is not finding:
                        skip = f"revoked for {first.rule.id}"
                    elif task.ended_at is not None:
                        skip = f"task already {task.status}"
                pending.append(actions.act(finding, skip_revoke=skip))
            results = await asyncio.gather(*pending)
            # Acts were queued last, so the last len(findings) results are theirs.
            outcomes = results[len(results) - len(findings) :]
            for outcome, (_finding, task) in zip(outcomes, findings, strict=True):
                if outcome is not None and outcome.outcome in ("revoked", "existing"):
                    # Known dead from now on: later uses are use-after-end, not new revokes.
                    task.end("revoked", outcome.created_at or now)
            self.metrics.events.labels(outcome="decided").inc(len(events))
            self._queue_commit(batch, usage)
            self.metrics.decision_latency.observe(time.perf_counter() - t0)

    @staticmethod
    def _score(model: ModelStage) -> list[tuple[Finding, TaskState]]:
        try:
            return model.flush()
        except Exception:  # a model bug must not stop the rules (or the detector)
            log.exception("model scoring failed; %d events not scored", model.pending)
            return []

    async def _dead_letter(
        self, actions: Actions, record: ConsumerRecord[bytes, bytes], reason: str
    ) -> None:
        self.metrics.events.labels(outcome="dead_letter").inc()
        log.info("dead letter %s/%d@%d: %s", record.topic, record.partition, record.offset, reason)
        await actions.dead_letter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            reason=reason,
        )

    async def _lookups(
        self,
        events: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes], UsageEvent]],
        service: ServiceClient,
        gate: StopGate,
        now: float,
    ) -> None:
        """Ask the service about tasks the tasks topic has not told us of (yet)."""
        wanted: dict[str, str] = {}
        for _tp, _record, event in events:
            if event.task_id not in wanted and self.store.needs_lookup(event.task_id, now):
                wanted[event.task_id] = event.agent_id
        if not wanted:
            return
        limit = asyncio.Semaphore(_LOOKUP_CONCURRENCY)

        async def one(task_id: str, agent_id: str) -> None:
            async with limit:
                view = await retrying(
                    f"look up task {task_id}", gate, lambda: service.get_task(task_id)
                )
            # A fact may have arrived meanwhile; the lookup only fills what is missing.
            if view is None:
                self.metrics.lookups.labels(outcome="not_found").inc()
                if self.store.needs_lookup(task_id, now):
                    self.store.mark_unknown(task_id, agent_id, now)
            else:
                self.metrics.lookups.labels(outcome="found").inc()
                self.store.apply_task_view(view)

        await asyncio.gather(*(one(t, a) for t, a in wanted.items()))

    # ---------------------------------------------------------------- commits

    def _queue_commit(self, batch: Batch, usage: AIOKafkaConsumer) -> None:
        """Hand a batch whose actions are all durable to the (single) background committer."""
        for tp, records in batch.items():
            if records:
                self._durable[tp] = records[-1].offset + 1
        committer = self._committer
        if committer is not None and not committer.done():
            return  # it picks these offsets up before it finishes
        if committer is not None:
            committer.result()  # a commit bug stops the detector, as it did inline
        self._committer = asyncio.create_task(self._commit_durable(usage))

    async def flush_commits(self) -> None:
        """Wait until every durable offset handed over so far is committed (or failed)."""
        committer = self._committer
        if committer is None:
            return
        self._hurry.set()
        try:
            await committer
        finally:
            self._hurry.clear()

    async def _commit_durable(self, usage: AIOKafkaConsumer) -> None:
        while self._durable:
            wait = self._last_commit + _COMMIT_EVERY - time.monotonic()
            if wait > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), wait)
            offsets, self._durable = self._durable, {}
            self._last_commit = time.monotonic()
            await self._commit(offsets, usage)

    async def _commit(self, offsets: dict[TopicPartition, int], usage: AIOKafkaConsumer) -> None:
        pause = self.settings.detector_test_pause_before_commit_ms
        if pause > 0:
            log.warning("test hook: pausing %d ms before commit", pause)
            await asyncio.sleep(pause / 1000)
        assigned = usage.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await usage.commit(offsets)
        except KafkaError as exc:
            # The group moved on; the new owner gets these records again (harmless).
            self.metrics.commits.labels(outcome="failed").inc()
            log.warning("commit failed, records will be redelivered: %s", exc)
            return
        self.metrics.commits.labels(outcome="ok").inc()
        self.processed.update(offsets)


async def run_detector(
    settings: Settings,
    *,
    service_url: str,
    token: str,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Run one detector until ``stop`` is set: finishes its batch, commits, stops clients.

    ``ready`` is set once the task and revocation facts are replayed and the consumer
    group has assigned partitions. Raises :class:`~detectors.actions.DetectorAuthError`
    if the service refuses ``token`` (it must be a ``detector`` operator token).
    """
    await Detector(settings, service_url=service_url, token=token).run(stop, ready)
