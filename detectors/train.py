"""Training and offline evaluation of the learned detector.

``python -m detectors train`` (also ``killswitch train``) reads usage and task events
from an events file (``detectors.traffic.write_events``; labels from its sidecar when
present) or replays the usage and tasks topics from Kafka, and writes a model artifact::

    python -m detectors train --events traffic.jsonl -o model.ksm
    python -m detectors train --from-kafka -o model.ksm          # KS_KAFKA_* settings
    python -m detectors evaluate --model model.ksm --events other.jsonl

The pipeline (every step shows on a rich progress bar):

1. split tasks into train / validation by a hash of the task id (``--val-share``);
2. learn the tool-sequence bigrams per agent type from the training tasks;
3. replay every event through the detector's own path (``Store``, the rules, the
   :class:`~detectors.features.FeatureExtractor`), so training features are exactly the
   live ones;
4. per agent type (and ``*``, all types pooled, for types never seen): fit an
   IsolationForest and a Nystroem + SGDOneClassSVM on benign training rows, calibrate each
   on the maxima of benign validation tasks, and keep the one with the better recall of
   the labelled in-scope attacks in the validation tasks at the alert level (no labels:
   the IsolationForest baseline); the comparison is recorded in the artifact;
5. save the artifact (no pickle; see detectors/models.py).

:func:`evaluate` replays a (labelled) traffic through rules + model exactly like the
consumer and reports per-scenario recall, false alerts per 1,000 benign tasks,
revocation precision and time-to-detect.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detectors.features import ANY_TYPE, FEATURES, AgentTyper, FeatureExtractor, SequenceModel
from detectors.models import (
    ALERT_LEVEL,
    MODEL_RULE_IDS,
    Artifact,
    ArtifactError,
    Kind,
    ModelStage,
    TypeModel,
    calibration,
    describe_artifact,
    fit_isolation_forest,
    fit_ocsvm,
    fit_tail,
    load_artifact,
)
from detectors.rules import Finding, Thresholds
from detectors.rules import evaluate as evaluate_rules
from detectors.state import Store
from detectors.traffic import MODEL_SCENARIOS, Label, Traffic, read_events
from service.kernel.events import TaskEvent, TaskEventKind, UsageEvent, decoder

__all__ = ["EvalReport", "evaluate", "main", "replay_features", "train"]

#: Per-event reference of the task statistic: this quantile of the raw scores of benign
#: validation events (only events stranger than it add to a task's running score).
REFERENCE_QUANTILE = 0.99

Progress = Callable[[str, int], Callable[[int], None]]
"""progress(description, total) -> advance(n)."""


def _no_progress(_what: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def _is_val(task_id: str, share: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < share


# --------------------------------------------------------------------------- replay


@dataclass
class Rows:
    """Feature rows of a replay, one per usage event, with where each came from."""

    x: np.ndarray[Any, np.dtype[np.float64]]
    task_ids: list[str]
    agent_types: list[str]
    index_in_task: list[int]


def replay_features(
    stream: Iterable[TaskEvent | UsageEvent],
    extractor: FeatureExtractor,
    *,
    total: int = 0,
    progress: Progress = _no_progress,
) -> Rows:
    """Every usage event's feature row, computed by the live path (store, rules, features)."""
    store = Store(denied_burst=10)
    thresholds = Thresholds()
    rows: list[tuple[float, ...]] = []
    task_ids: list[str] = []
    types: list[str] = []
    index: list[int] = []
    seen: dict[str, int] = {}
    advance = progress("features", total)
    n = 0
    for event in stream:
        if isinstance(event, TaskEvent):
            store.apply_task_event(event)
            continue
        task, agent = store.observe(event, 0, event.at)
        evaluate_rules(event, task, agent, thresholds)
        rows.append(extractor.update(event, task, agent))
        task_ids.append(event.task_id)
        types.append(extractor.agent_type(agent))
        k = seen.get(event.task_id, 0)
        seen[event.task_id] = k + 1
        index.append(k)
        n += 1
        if n % 5000 == 0:
            advance(5000)
    advance(n % 5000)
    x = np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))
    return Rows(x, task_ids, types, index)


# --------------------------------------------------------------------------- training


def _attack_rows(
    rows: Rows, labels: dict[str, Label], mask: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    out = np.zeros(len(rows.task_ids), dtype=bool)
    for i in np.flatnonzero(mask):
        label = labels.get(rows.task_ids[i])
        if label is None or label.scenario is None or label.attack_start_index is None:
            continue
        out[i] = rows.index_in_task[i] >= label.attack_start_index
    return out


def _task_max(
    task_ids: list[str], idx: np.ndarray[Any, Any], values: np.ndarray[Any, Any]
) -> dict[str, float]:
    best: dict[str, float] = {}
    for i, v in zip(idx.tolist(), values.tolist(), strict=True):
        t = task_ids[i]
        if v > best.get(t, -np.inf):
            best[t] = v
    return best


def _cusum(
    task_ids: list[str], idx: np.ndarray[Any, Any], steps: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """The task statistic after each row (rows in event order): ``s = max(0, s + step)``
    per task, exactly as :meth:`ModelStage.flush` computes it live."""
    running: dict[str, float] = {}
    out = np.empty(len(idx))
    for k, (i, step) in enumerate(zip(idx.tolist(), steps.tolist(), strict=True)):
        t = task_ids[i]
        s = running.get(t, 0.0) + step
        if s < 0.0:
            s = 0.0
        running[t] = out[k] = s
    return out


def train(
    traffic: Traffic,
    *,
    val_share: float = 0.5,
    reference_quantile: float = REFERENCE_QUANTILE,
    seed: int = 0,
    alert_level: float = ALERT_LEVEL,
    revoke_level: float = 1.5,
    agent_type_pattern: str = "",
    kinds: tuple[Kind, ...] = ("isolation_forest", "nystroem_ocsvm"),
    progress: Progress = _no_progress,
    source: str = "",
) -> Artifact:
    """Train an artifact on ``traffic`` (labels optional; see the module docstring)."""
    typer = AgentTyper(agent_type_pattern)
    labels = traffic.labels
    attacked = {t for t, lb in labels.items() if lb.scenario is not None}
    val_tasks = {t.task_id for t in traffic.tasks if _is_val(t.task_id, val_share, seed)}
    by_task: dict[str, list[str]] = {}
    agent_of: dict[str, str] = {}
    from detectors.features import tool_of

    for event in traffic.events:
        if event.task_id in val_tasks or event.task_id in attacked:
            continue
        by_task.setdefault(event.task_id, []).append(tool_of(event.action, event.resource))
        agent_of[event.task_id] = event.agent_id
    sequences = SequenceModel.learn((typer(agent_of[t]), tools) for t, tools in by_task.items())

    rows = replay_features(
        traffic.stream(),
        FeatureExtractor(sequences, typer),
        total=len(traffic.events),
        progress=progress,
    )
    is_val = np.fromiter((t in val_tasks for t in rows.task_ids), bool, len(rows.task_ids))
    is_attacked_task = np.fromiter((t in attacked for t in rows.task_ids), bool, len(is_val))
    attack_row = _attack_rows(rows, labels, is_val & is_attacked_task)
    if not 0.0 < reference_quantile < 1.0:
        raise ValueError("reference_quantile must be within (0, 1)")
    types = np.asarray(rows.agent_types)
    models: dict[str, TypeModel] = {}
    names = [*sorted(set(rows.agent_types)), ANY_TYPE]
    advance = progress("models", len(names) * len(kinds))
    model_scenario_tasks = {t for t, lb in labels.items() if lb.scenario in MODEL_SCENARIOS}
    for name in names:
        of_type = np.ones(len(types), bool) if name == ANY_TYPE else types == name
        train_mask = of_type & ~is_val & ~is_attacked_task
        benign_val = of_type & is_val & ~is_attacked_task
        attack_val = of_type & attack_row
        if train_mask.sum() < 50 or benign_val.sum() == 0:
            advance(len(kinds))
            continue
        x_train = rows.x[train_mask]
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0) + 1e-3
        candidates: dict[str, TypeModel] = {}
        comparison: dict[str, Any] = {}
        for kind in kinds:
            est = (
                fit_isolation_forest(x_train, seed=seed)
                if kind == "isolation_forest"
                else fit_ocsvm(x_train, seed=seed)
            )
            model = TypeModel(name, kind, est, np.zeros(1), np.zeros(1), mean, std)
            # Every validation row of the type, attacked tasks' benign prefixes included:
            # the task statistic runs over whole tasks, as it does live.
            idx = np.flatnonzero(of_type & is_val)
            raw = model.anomaly(rows.x[idx])
            benign = ~is_attacked_task[idx]
            model.reference = float(np.quantile(raw[benign], reference_quantile))
            stat = _cusum(rows.task_ids, idx, model.accumulate(raw))
            maxima = np.asarray(list(_task_max(rows.task_ids, idx[benign], stat[benign]).values()))
            model.levels, model.values = calibration(maxima)
            model.tail = fit_tail(maxima)
            model.n_train = int(train_mask.sum())
            model.n_val_tasks = len(maxima)
            attack = attack_val[idx]
            attack_max = _task_max(rows.task_ids, idx[attack], stat[attack])
            in_scope = {t: v for t, v in attack_max.items() if t in model_scenario_tasks}
            scores = (
                model.calibrate(np.asarray(list(in_scope.values()))) if in_scope else np.zeros(0)
            )
            recall = float((scores >= alert_level).mean()) if len(scores) else None
            comparison[kind] = {
                "val_in_scope_attack_tasks": len(in_scope),
                "recall_at_alert_level": recall,
                "median_attack_score": float(np.median(scores)) if len(scores) else None,
            }
            candidates[kind] = model
            advance(1)

        def key(kind: str, comparison: dict[str, Any] = comparison) -> tuple[float, float]:
            c = comparison[kind]
            return (c["recall_at_alert_level"] or 0.0, c["median_attack_score"] or 0.0)

        labelled = any(c["val_in_scope_attack_tasks"] for c in comparison.values())
        if labelled:
            chosen = max(candidates, key=key)
            comparison["chosen"] = chosen
            comparison["chosen_by"] = "recall of labelled in-scope attacks at the alert level"
        else:
            chosen = "isolation_forest" if "isolation_forest" in candidates else kinds[0]
            comparison["chosen"] = chosen
            comparison["chosen_by"] = "baseline (no labelled attacks to compare on)"
        best = candidates[chosen]
        best.comparison = comparison
        models[name] = best
    if not models:
        raise ValueError("not enough benign events to train any model (need >= 50 per type)")
    return Artifact(
        models=models,
        sequences=sequences,
        alert_level=alert_level,
        revoke_level=revoke_level,
        agent_type_pattern=agent_type_pattern,
        training={
            "source": source,
            "events": len(traffic.events),
            "tasks": len(traffic.tasks),
            "labelled_attack_tasks": len(attacked),
            "val_share": val_share,
            "reference_quantile": reference_quantile,
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalReport:
    tasks: int
    benign_tasks: int
    recall: dict[str, float]
    detected_by: dict[str, dict[str, int]]
    false_alerts_per_1000: float
    false_model_alerts_per_1000: float
    revocations: int
    revocation_precision: float | None
    false_revocations: int
    ttd_events: dict[str, float | None]
    median_ttd_events: float | None
    median_ttd_seconds: float | None
    events: int
    seconds: float
    findings: list[tuple[Finding, int]] = field(default_factory=list, repr=False)
    stage: ModelStage | None = field(default=None, repr=False)

    def table(self) -> str:
        lines = [f"{'scenario':<24} {'recall':>7} {'median TTD (events)':>20}  detected by"]
        for scenario, recall in self.recall.items():
            ttd = self.ttd_events.get(scenario)
            by = ", ".join(f"{k}={v}" for k, v in sorted(self.detected_by[scenario].items()))
            lines.append(
                f"{scenario:<24} {recall:>7.2f} {'-' if ttd is None else f'{ttd:g}':>20}  {by}"
            )
        precision = (
            "n/a" if self.revocation_precision is None else f"{self.revocation_precision:.3f}"
        )
        ttd_s = self.median_ttd_seconds
        lines += [
            f"benign tasks: {self.benign_tasks:,}; false alerts per 1,000 benign tasks: "
            f"{self.false_alerts_per_1000:.2f} (model {self.false_model_alerts_per_1000:.2f})",
            f"revocations: {self.revocations:,}, precision {precision} "
            f"({self.false_revocations} of benign tasks)",
            f"median time-to-detect: {self.median_ttd_events} events, "
            f"{'-' if ttd_s is None else round(ttd_s, 3)} s into the attack",
        ]
        return "\n".join(lines)


def evaluate(
    artifact: Artifact | None,
    traffic: Traffic,
    *,
    batch_events: int = 1024,
    alert_level: float | None = None,
    revoke_level: float | None = None,
) -> EvalReport:
    """Replay ``traffic`` through rules (+ the model, if any) exactly like the consumer."""
    t0 = time.perf_counter()
    store = Store(denied_burst=10)
    thresholds = Thresholds()
    stage = (
        ModelStage(
            artifact,
            batch_events=batch_events,
            alert_level=alert_level,
            revoke_level=revoke_level,
            keep_scores=True,
        )
        if artifact is not None
        else None
    )
    position: dict[str, int] = {}
    index_of: dict[str, int] = {}
    findings: list[tuple[Finding, int]] = []

    def act(found: Iterable[Finding]) -> None:
        for finding in found:
            findings.append((finding, index_of[finding.event.event_id]))
            if finding.rule.action == "revoke":
                task = store.tasks.get(finding.task_id)
                if task is not None:
                    task.end("revoked", finding.event.at)

    n = 0
    for event in traffic.stream():
        if isinstance(event, TaskEvent):
            store.apply_task_event(event)
            continue
        n += 1
        k = position.get(event.task_id, 0)
        position[event.task_id] = k + 1
        index_of[event.event_id] = k
        task, agent = store.observe(event, 0, event.at)
        act(evaluate_rules(event, task, agent, thresholds))
        if stage is not None and stage.add(event, task, agent):
            act(f for f, _ in stage.flush())
    if stage is not None:
        act(f for f, _ in stage.flush())
    seconds = time.perf_counter() - t0
    return _report(traffic, findings, stage, n, seconds)


def _report(
    traffic: Traffic,
    findings: list[tuple[Finding, int]],
    stage: ModelStage | None,
    events: int,
    seconds: float,
) -> EvalReport:
    labels = traffic.labels
    first: dict[str, tuple[Finding, int]] = {}
    after_attack: dict[str, tuple[Finding, int]] = {}
    revoked: set[str] = set()
    model_alerted: set[str] = set()
    for finding, index in findings:
        task_id = finding.task_id
        first.setdefault(task_id, (finding, index))
        label = labels.get(task_id)
        start = label.attack_start_index if label is not None else None
        if start is not None and index >= start:
            after_attack.setdefault(task_id, (finding, index))
        if finding.rule.action == "revoke":
            revoked.add(task_id)
        if finding.rule.id in MODEL_RULE_IDS:
            model_alerted.add(task_id)
    benign = [t.task_id for t in traffic.tasks if labels.get(t.task_id, _BENIGN).scenario is None]
    recall: dict[str, float] = {}
    detected_by: dict[str, dict[str, int]] = {}
    ttd: dict[str, float | None] = {}
    all_ttd: list[int] = []
    all_ttd_s: list[float] = []
    scenarios = sorted({lb.scenario for lb in labels.values() if lb.scenario is not None})
    for scenario in scenarios:
        tasks = [t for t, lb in labels.items() if lb.scenario == scenario]
        hits = [after_attack[t] for t in tasks if t in after_attack]
        recall[scenario] = len(hits) / len(tasks) if tasks else 0.0
        by: dict[str, int] = {}
        delays = []
        for finding, index in hits:
            by[finding.rule.id] = by.get(finding.rule.id, 0) + 1
            label = labels[finding.task_id]
            assert label.attack_start_index is not None
            delays.append(index - label.attack_start_index + 1)
            all_ttd.append(index - label.attack_start_index + 1)
            if label.attack_start_at is not None:
                all_ttd_s.append(finding.event.at - label.attack_start_at)
        detected_by[scenario] = by
        ttd[scenario] = statistics.median(delays) if delays else None
    false_any = sum(1 for t in benign if t in first)
    false_model = sum(1 for t in benign if t in model_alerted)
    attacked = {t for t, lb in labels.items() if lb.scenario is not None}
    good_revocations = len(revoked & attacked)
    n_benign = max(1, len(benign))
    return EvalReport(
        tasks=len(traffic.tasks),
        benign_tasks=len(benign),
        recall=recall,
        detected_by=detected_by,
        false_alerts_per_1000=1000 * false_any / n_benign,
        false_model_alerts_per_1000=1000 * false_model / n_benign,
        revocations=len(revoked),
        revocation_precision=good_revocations / len(revoked) if revoked else None,
        false_revocations=len(revoked) - good_revocations,
        ttd_events=ttd,
        median_ttd_events=statistics.median(all_ttd) if all_ttd else None,
        median_ttd_seconds=statistics.median(all_ttd_s) if all_ttd_s else None,
        events=events,
        seconds=seconds,
        findings=findings,
        stage=stage,
    )


_BENIGN = Label("", None, None, None)


# --------------------------------------------------------------------------- sources


async def read_kafka(settings: Any, *, progress: Progress = _no_progress) -> Traffic:
    """Replay the usage and tasks topics from the beginning up to their current ends."""
    from service import kafka

    consumer = kafka.consumer(
        settings,
        settings.kafka_usage_topic,
        settings.kafka_tasks_topic,
        client_id="killswitch-train",
        group_id=None,
    )
    await consumer.start()
    tasks: list[TaskEvent] = []
    closed: list[TaskEvent] = []
    events: list[UsageEvent] = []
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        assignment = list(consumer.assignment())
        await consumer.seek_to_beginning(*assignment)
        # A rough total for the progress bar only (tansu's end_offsets count batches);
        # being caught up is judged on fetched high-water marks (service.kafka.behind).
        ends = await consumer.end_offsets(assignment)
        advance = progress("kafka", sum(ends.values()))
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                advance(len(records))
                for record in records:
                    try:
                        event = decoder.decode(record.value or b"")
                    except Exception:  # noqa: S112 - undecodable records are the DLQ's business
                        continue
                    if isinstance(event, UsageEvent):
                        events.append(event)
                    elif isinstance(event, TaskEvent):
                        (closed if event.kind is TaskEventKind.CLOSED else tasks).append(event)
            if not await kafka.behind(consumer, assignment):
                break
    finally:
        await consumer.stop()
    events.sort(key=lambda e: e.at)
    tasks.sort(key=lambda e: e.at)
    return Traffic(
        tasks=tasks, events=events, labels={}, event_labels=[None] * len(events), closed=closed
    )


# --------------------------------------------------------------------------- command line


class _RichProgress:
    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichBar,
        )

        self.bar = RichBar(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )

    def __enter__(self) -> Progress:
        self.bar.start()

        def progress(what: str, total: int) -> Callable[[int], None]:
            task = self.bar.add_task(what, total=total or None)
            return lambda n: self.bar.advance(task, n)

        return progress

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train a model artifact",
        description="Train the detector's anomaly model from an events file or Kafka, and "
        "write it as an artifact (no pickle) for KS_DETECTOR_MODEL.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--events", type=Path, help="events file (detectors.traffic write_events)")
    src.add_argument("--from-kafka", action="store_true", help="replay the usage/tasks topics")
    p.add_argument("-o", "--output", type=Path, required=True, help="artifact path to write")
    p.add_argument("--val-share", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference-quantile",
        type=float,
        default=REFERENCE_QUANTILE,
        help="benign per-event quantile a call must exceed to add to its task's score",
    )
    p.add_argument("--alert-level", type=float, default=ALERT_LEVEL)
    p.add_argument("--revoke-level", type=float, default=1.5)
    p.add_argument("--agent-type-pattern", default="", help="regex with a 'type' group")
    p.add_argument("--evaluate", type=Path, help="then evaluate on this (labelled) events file")
    p = sub.add_parser("evaluate", help="evaluate rules + a model on a labelled events file")
    p.add_argument("--model", type=Path, help="artifact (omit: rules only)")
    p.add_argument("--events", type=Path, required=True)
    return parser


def _print_eval(artifact: Artifact | None, path: Path) -> None:
    report = evaluate(artifact, read_events(path))
    print(report.table())
    print(f"{report.events:,} events in {report.seconds:.2f}s offline")


def main(argv: list[str] | None = None, *, prog: str = "python -m detectors") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        if args.command == "evaluate":
            _print_eval(load_artifact(args.model) if args.model else None, args.events)
            return 0
        with _RichProgress() as progress:
            if args.from_kafka:
                from service.config import Settings

                settings = Settings.from_env()
                if not settings.kafka_bootstrap:
                    print(
                        "killswitch train: --from-kafka needs KS_KAFKA_BOOTSTRAP", file=sys.stderr
                    )
                    return 2
                traffic = asyncio.run(read_kafka(settings, progress=progress))
                source = f"kafka:{settings.kafka_usage_topic}"
            else:
                traffic = read_events(args.events)
                source = str(args.events)
            artifact = train(
                traffic,
                val_share=args.val_share,
                reference_quantile=args.reference_quantile,
                seed=args.seed,
                alert_level=args.alert_level,
                revoke_level=args.revoke_level,
                agent_type_pattern=args.agent_type_pattern,
                progress=progress,
                source=source,
            )
        artifact.save(args.output)
        print(f"wrote {args.output}")
        print(describe_artifact(artifact), end="")
        if args.evaluate:
            _print_eval(artifact, args.evaluate)
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"killswitch train: {exc}", file=sys.stderr)
        return 2
    return 0
