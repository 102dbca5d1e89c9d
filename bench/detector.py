"""Detector throughput on one core: rules only, rules + model features, and rules + the
anomaly model (features + micro-batched scoring), next to msgspec's raw decode rate of the
same events in the same run.

No broker and no service: pre-encoded UsageEvents (as they sit in a fetched Kafka batch)
go through exactly the per-record path of detectors/consumer.py (the one typed decoder,
``Store.observe``, ``rules.evaluate``, and with the model ``ModelStage.add`` per event and
``ModelStage.flush`` per micro-batch of ``--model-batch`` events). Findings are counted,
not acted on. The model is trained first on generated traffic (detectors.traffic, not
timed) unless ``--model`` names an artifact.

    python bench/detector.py                 # 1,000 tasks, 200,000 events, 1% violations
    python bench/detector.py --events 500000 --tasks 10000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable

import msgspec
from threadpoolctl import threadpool_limits

from detectors.models import Artifact, ModelStage, load_artifact
from detectors.rules import Thresholds, evaluate
from detectors.state import Store
from service.kernel.events import (
    Decision,
    Source,
    TaskEvent,
    TaskEventKind,
    UsageEvent,
    decoder,
    encoder,
)
from service.kernel.scopes import Limits, ScopeSpec


def make_events(
    n_events: int, n_tasks: int, violation_rate: float
) -> tuple[list[TaskEvent], list[bytes]]:
    rng = random.Random(7)
    now = time.time()
    tasks = []
    for i in range(n_tasks):
        scope = ScopeSpec(
            grants=("call:tool/invoices.*", "GET:https://api.internal/v1/repos/**"),
            audiences=("https://tools.internal",),
            limits=Limits(max_calls=10**9, max_bytes_out=10**12, max_rate=10_000.0),
        )
        tasks.append(
            TaskEvent(
                event_id=f"t{i}",
                at=now,
                kind=TaskEventKind.OPENED,
                task_id=f"task-{i:06d}",
                agent_id=f"agent-{i % 200:04d}",
                status="active",
                scope=scope,
                deadline=now + 3600,
            )
        )
    values = []
    for n in range(n_events):
        task = tasks[rng.randrange(n_tasks)]
        bad = rng.random() < violation_rate
        event = UsageEvent(
            event_id=f"e{n}",
            at=now + n * 1e-5,
            agent_id=task.agent_id,
            task_id=task.task_id,
            jti_hash=f"jti-{task.task_id}",
            action="call" if n % 2 else "GET",
            resource=(
                "tool/payments.send"
                if bad
                else ("tool/invoices.read" if n % 2 else "https://api.internal/v1/repos/x/y")
            ),
            audience="https://tools.internal",
            decision=Decision.ALLOW,
            bytes_out=rng.randrange(0, 4096),
            source=Source(address="10.0.0.7", user_agent="agent-sdk/1.0"),
            guard="bench",
        )
        values.append(encoder.encode(event))
    return tasks, values


def best_of(rounds: int, fn: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    result = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--violations", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    parser.add_argument("--model", help="model artifact (default: train one, untimed)")
    parser.add_argument("--model-batch", type=int, default=1024)
    args = parser.parse_args()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})

    tasks, values = make_events(args.events, args.tasks, args.violations)
    thresholds = Thresholds()
    usage_only = msgspec.json.Decoder(UsageEvent)

    def raw_decode() -> int:
        decode = decoder.decode
        for value in values:
            decode(value)
        return len(values)

    def raw_decode_usage_only() -> int:
        decode = usage_only.decode
        for value in values:
            decode(value)
        return len(values)

    def detector_path() -> int:
        store = Store(denied_burst=10)
        for task in tasks:
            store.apply_task_event(task)
        decode = decoder.decode
        observe = store.observe
        now = time.time()
        findings = 0
        for value in values:
            event = decode(value)
            if isinstance(event, UsageEvent):
                task_state, agent = observe(event, 0, now)
                findings += len(evaluate(event, task_state, agent, thresholds))
        return findings

    artifact = load_artifact(args.model) if args.model else _train_artifact()
    threadpool_limits(1)  # as the detector does: one core

    def with_model(score: bool) -> Callable[[], int]:
        def run() -> int:
            store = Store(denied_burst=10)
            for task in tasks:
                store.apply_task_event(task)
            stage = ModelStage(artifact, batch_events=args.model_batch)
            decode = decoder.decode
            observe = store.observe
            add = stage.add
            now = time.time()
            findings = 0
            for value in values:
                event = decode(value)
                if isinstance(event, UsageEvent):
                    task_state, agent = observe(event, 0, now)
                    findings += len(evaluate(event, task_state, agent, thresholds))
                    if add(event, task_state, agent):
                        if score:
                            findings += len(stage.flush())
                        else:
                            stage._rows, stage._refs = type(stage._rows)("d"), []
            findings += len(stage.flush()) if score else 0
            return findings

        return run

    rows = []
    for name, fn in (
        ("msgspec decode (typed Event union)", raw_decode),
        ("msgspec decode (UsageEvent only)", raw_decode_usage_only),
        ("detector: decode + state + rules", detector_path),
        ("  + model features (no scoring)", with_model(False)),
        ("  + model (features + scoring)", with_model(True)),
    ):
        seconds, result = best_of(args.rounds, fn)
        rows.append(
            {
                "what": name,
                "events_per_s": len(values) / seconds,
                "us_per_event": seconds / len(values) * 1e6,
                "findings": None if name.startswith("msgspec") else result,
            }
        )
    if args.json:
        doc = {"events": len(values), "tasks": len(tasks), "model": artifact.model_id, "rows": rows}
        print(json.dumps(doc, indent=2))
        return
    rules_only = float(rows[2]["events_per_s"])  # type: ignore[arg-type]
    features = float(rows[3]["events_per_s"])  # type: ignore[arg-type]
    model_on = float(rows[4]["events_per_s"])  # type: ignore[arg-type]
    print(
        f"{len(values):,} events over {len(tasks):,} tasks, {args.violations:.0%} out of scope, "
        f"one core, best of {args.rounds}"
    )
    print(
        f"model {artifact.model_id}: "
        f"{', '.join(sorted({m.kind for m in artifact.models.values()}))}, "
        f"micro-batches of {args.model_batch}"
    )
    print(f"{'path':<38} {'events/s':>12} {'µs/event':>9} {'findings':>9}")
    for row in rows:
        findings = "" if row["findings"] is None else f"{row['findings']:,}"
        print(
            f"{row['what']:<38} {row['events_per_s']:>12,.0f} "
            f"{row['us_per_event']:>9.2f} {findings:>9}"
        )
    ratio = float(rows[2]["events_per_s"]) / float(rows[0]["events_per_s"])  # type: ignore[arg-type]
    print(f"detector / raw typed decode: {ratio:.0%}  (target: >= 100,000 events/s)")
    print(
        f"features on: {features / rules_only:.0%} of rules-only (target: >= 80%); "
        f"model on: {model_on:,.0f} events/s = {model_on / rules_only:.0%} of rules-only "
        "(target: >= 50,000 events/s)"
    )


def _train_artifact() -> Artifact:
    import tempfile

    from detectors.traffic import generate
    from detectors.train import train

    artifact = train(generate(seed=1, tasks=1500, attack_rate=0.05))
    with tempfile.TemporaryDirectory() as tmp:
        return load_artifact(artifact.save(f"{tmp}/bench.ksm"))


if __name__ == "__main__":
    main()
