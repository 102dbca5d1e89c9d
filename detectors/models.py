"""The learned detector: per-agent-type anomaly models, their artifact, scoring and policy.

What lives here::

    TypeModel       one agent type's model: the estimator (IsolationForest, or Nystroem +
                    SGDOneClassSVM), its calibration (quantiles of benign validation task
                    maxima) and feature means/stds (to explain a score)
    Artifact        every type's model + the tool-sequence bigrams + thresholds, saved
                    WITHOUT pickle (a zip: manifest.json + one skops file per estimator,
                    loaded with an explicit trusted-types list); refused on load when its
                    scikit-learn version or feature list/version differ from this build
    ModelStage      the detector's model step: feature rows accumulate per event (cheap),
                    are scored in micro-batches (never one ``score_samples`` per event),
                    calibrated, and turned into findings by the policy below

Scores. ``raw`` is the estimator's anomaly score (higher = stranger): ``-score_samples`` for
the IsolationForest, ``-log(score_samples)`` for the one-class SVM (whose kernel sum
otherwise flattens out far from the data).
Targets are per task, so the model scores tasks: a CUSUM ``s = max(0, s + raw -
reference)`` over each task's events (``reference``: the 99th percentile of benign
validation events' raw scores), so one very strange call or many mildly strange ones
raise it. ``score`` calibrates ``s`` per agent type against its maxima over benign
*validation tasks*: the empirical quantile up to the 95th percentile, then an exponential
tail fitted on the top 5 % (``score = 1 - P(benign task > s)``), reaching 1 at a tail
probability of 1e-4 and growing by 1 per further factor of 10 (see :func:`fit_tail`).

Policy. ``score >= alert level`` raises a ``model.anomaly`` alert (once per task).
``score >= revoke level`` revokes (``model.anomaly_confirmed``) only when an independent,
deterministic signal agrees on the same task: a rule already fired on it, its credential
was presented from a source this agent never used before, it has two or more sources, or
at least 3 of its calls (and a quarter) were denied. Every finding carries the score, the
raw score, the thresholds, the features that drove it (largest |z| against the type's
benign training rows) and the model id and versions.

This module performs no I/O except :meth:`Artifact.save` / :func:`load_artifact`.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import sklearn
from numpy.typing import NDArray

from detectors.features import (
    ANY_TYPE,
    FEATURE_VERSION,
    FEATURES,
    AgentTyper,
    FeatureExtractor,
    SequenceModel,
    TaskWindow,
)
from detectors.rules import NOT_SIGNALS, Finding, Rule
from detectors.state import AgentState, TaskState
from service.kernel.errors import KillSwitchError
from service.kernel.events import Severity, UsageEvent

__all__ = [
    "ARTIFACT_FORMAT",
    "MODEL_ALERT",
    "MODEL_REVOKE",
    "Artifact",
    "ArtifactError",
    "ModelStage",
    "TypeModel",
    "fit_isolation_forest",
    "fit_ocsvm",
    "load_artifact",
]

ARTIFACT_FORMAT: Final = "killswitch.detector-model"
ARTIFACT_FORMAT_VERSION: Final = 2
#: skops refuses to load any type not listed; these are the only non-default ones our
#: estimators contain (IsolationForest's trees).
TRUSTED_TYPES: Final = frozenset({"sklearn.tree._tree.Tree"})

#: Default alert level: a task score rarer than ~1 in 10,000 benign tasks by the fitted
#: tail (measured on fresh traffic: ~0.4 false alerts per 1,000 benign tasks; the tail
#: fitted on validation tasks is a few times optimistic that deep).
ALERT_LEVEL: Final = 0.9999

#: Floor of the one-class SVM's score before its log (far-away rows all land here).
OCSVM_FLOOR: Final = 1e-12

Kind = Literal["isolation_forest", "nystroem_ocsvm"]
Array = NDArray[np.float64]


def _never(*_: object) -> Finding | None:
    return None


MODEL_ALERT: Final = Rule(
    "model.anomaly",
    Severity.MEDIUM,
    "alert",
    _never,
    "behaviour unlike the agent type's benign tasks (score >= alert level)",
)
MODEL_REVOKE: Final = Rule(
    "model.anomaly_confirmed",
    Severity.HIGH,
    "revoke",
    _never,
    "score >= revoke level and an independent deterministic signal agrees",
)
MODEL_RULE_IDS: Final = frozenset({MODEL_ALERT.id, MODEL_REVOKE.id})


class ArtifactError(KillSwitchError):
    """A model artifact that cannot be used (missing, corrupt, or built for another
    scikit-learn version or feature list)."""


# --------------------------------------------------------------------------- estimators


def fit_isolation_forest(x: Array, *, seed: int = 0, trees: int = 100) -> Any:
    from sklearn.ensemble import IsolationForest

    return IsolationForest(n_estimators=trees, max_samples=256, random_state=seed).fit(x)


def fit_ocsvm(
    x: Array, *, seed: int = 0, components: int = 100, nu: float = 0.005, epochs: int = 5
) -> Any:
    """StandardScaler -> Nystroem (RBF) -> SGDOneClassSVM trained with ``partial_fit`` in
    shuffled mini-batches (so the same model can keep learning from a stream)."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import SGDOneClassSVM
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    n_comp = max(2, min(components, len(z)))
    kernel = Nystroem(gamma=1.0 / x.shape[1], n_components=n_comp, random_state=seed).fit(z)
    phi = kernel.transform(z)
    svm = SGDOneClassSVM(nu=nu, random_state=seed, learning_rate="optimal")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(phi))
        for start in range(0, len(order), 4096):
            svm.partial_fit(phi[order[start : start + 4096]])
    return Pipeline([("scale", scaler), ("kernel", kernel), ("svm", svm)])


class _Compiled:
    """``-score_samples`` of a fitted estimator, without sklearn's per-call overhead.

    IsolationForest: each tree's Cython ``apply`` plus the path lengths sklearn itself
    precomputes; the pipeline: plain matrix products. Checked against sklearn's own
    ``score_samples`` when built; falls back to sklearn if anything differs.
    """

    def __init__(self, kind: Kind, estimator: Any) -> None:
        self.kind = kind
        self.estimator = estimator
        self.fast = False
        try:
            self._prepare()
            probe = np.random.default_rng(0).normal(size=(64, estimator_features(estimator)))
            probe[:, : min(3, probe.shape[1])] *= 5
            self.fast = bool(np.allclose(self._fast(probe), self._sklearn(probe), atol=1e-9))
        except (AttributeError, ValueError, TypeError, IndexError):
            self.fast = False

    def _prepare(self) -> None:
        est = self.estimator
        if self.kind == "isolation_forest":
            from sklearn.ensemble._iforest import _average_path_length

            self._trees = [e.tree_ for e in est.estimators_]
            self._paths = [
                np.asarray(d, dtype=np.float64) + np.asarray(a, dtype=np.float64) - 1.0
                for d, a in zip(
                    est._decision_path_lengths, est._average_path_length_per_tree, strict=True
                )
            ]
            self._norm = float(len(self._trees) * _average_path_length([est.max_samples_])[0])
        else:
            scale, kernel, svm = (step for _, step in est.steps)
            self._mean = np.asarray(scale.mean_, dtype=np.float64)
            self._scale = np.asarray(scale.scale_, dtype=np.float64)
            self._comp = np.asarray(kernel.components_, dtype=np.float64)
            self._comp_sq = (self._comp**2).sum(axis=1)
            self._gamma = float(kernel.gamma)
            self._proj = np.asarray(kernel.normalization_, dtype=np.float64).T @ np.asarray(
                svm.coef_, dtype=np.float64
            ).reshape(-1)

    def _fast(self, x: Array) -> Array:
        if self.kind == "isolation_forest":
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            depth = np.zeros(len(x32))
            for tree, path in zip(self._trees, self._paths, strict=True):
                depth += path[tree.apply(x32)]
            out: Array = 2.0 ** (-depth / self._norm)
            return out
        z = (x - self._mean) / self._scale
        sq = (z**2).sum(axis=1)[:, None] + self._comp_sq[None, :] - 2.0 * (z @ self._comp.T)
        # Clipped so far-away rows never produce (slow) denormals; exp(-700) ~ 1e-304.
        k = np.exp(np.maximum(-self._gamma * np.maximum(sq, 0.0), -700.0))
        result: Array = -(k @ self._proj)
        return result

    def _sklearn(self, x: Array) -> Array:
        result: Array = -np.asarray(self.estimator.score_samples(x), dtype=np.float64)
        return result

    def anomaly(self, x: Array) -> Array:
        """Higher = stranger. The one-class SVM's ``score_samples`` (a kernel sum) sinks to
        0 far from the data, so it is taken as ``-log``: distance-like, unbounded."""
        neg = self._fast(x) if self.fast else self._sklearn(x)
        if self.kind == "nystroem_ocsvm":
            out: Array = -np.log(np.maximum(-neg, OCSVM_FLOOR))
            return out
        return neg


def estimator_features(estimator: Any) -> int:
    return int(estimator.n_features_in_)


# --------------------------------------------------------------------------- calibration


@dataclass
class TypeModel:
    agent_type: str
    kind: Kind
    estimator: Any
    levels: Array
    """Quantile levels (0..1) of ..."""
    values: Array
    """... the raw scores of benign validation task maxima at those levels (ascending)."""
    mean: Array
    std: Array
    n_train: int = 0
    n_val_tasks: int = 0
    comparison: dict[str, Any] = field(default_factory=dict)
    reference: float | None = None
    """Per-event reference of the task statistic (a CUSUM: ``s = max(0, s + raw -
    reference)``); ``None``: every event is scored on its own."""
    tail: tuple[float, float, float] | None = None
    """Exponential tail ``(u, beta, p_u)`` of the benign task statistic above ``u``."""
    _compiled: _Compiled | None = field(default=None, repr=False)

    @property
    def compiled(self) -> _Compiled:
        if self._compiled is None:
            self._compiled = _Compiled(self.kind, self.estimator)
        return self._compiled

    def anomaly(self, x: Array) -> Array:
        return self.compiled.anomaly(x)

    def accumulate(self, raw: Array) -> Array:
        """Per-event increments of the task score: ``raw - reference`` (or ``raw`` as is
        for a model without a reference, which scores single events)."""
        if self.reference is None:
            return raw
        out: Array = raw - self.reference
        return out

    def calibrate(self, raw: Array) -> Array:
        """Task statistic (or raw score) -> calibrated score, against benign tasks."""
        values, levels = self.values, self.levels
        if self.tail is not None:
            return _tail_score(raw, values, levels, self.tail)
        top, median = float(values[-1]), float(np.interp(0.5, levels, values))
        spread = max(top - median, 1e-9)
        score: Array = np.interp(raw, values, levels)
        above = raw > top
        if above.any():
            score[above] = 1.0 + (raw[above] - top) / spread
        return score

    def explain(self, row: Sequence[float], top: int = 5) -> list[dict[str, Any]]:
        x = np.asarray(row, dtype=np.float64)
        z = (x - self.mean) / self.std
        order = np.argsort(-np.abs(z))[:top]
        return [
            {"name": FEATURES[i], "value": round(float(x[i]), 4), "z": round(float(z[i]), 2)}
            for i in order
        ]


def calibration(task_maxima: Array, points: int = 2001) -> tuple[Array, Array]:
    """(levels, values): quantiles of benign validation task maxima."""
    if len(task_maxima) == 0:
        raise ValueError("no benign validation tasks to calibrate on")
    levels = np.linspace(0.0, 1.0, points)
    values = np.quantile(task_maxima, levels)
    return levels, np.maximum.accumulate(values)


#: Share of the benign task maxima (at least TAIL_MIN of them) the exponential tail is
#: fitted on.
TAIL_SHARE: Final = 0.05
TAIL_MIN: Final = 20
#: Tail probability at which calibrated scores reach 1; each unit above 1 is a further
#: factor of 10 rarer (so the revoke level 1.5 is ~ 1 in 30,000 benign tasks).
SCORE_ONE: Final = 1e-4


def fit_tail(task_maxima: Array, share: float = TAIL_SHARE) -> tuple[float, float, float] | None:
    """An exponential tail ``P(X > x) = p_u exp(-(x - u) / beta)`` for ``x > u``, fitted
    (maximum likelihood) on the largest ``share`` of ``task_maxima``; ``None`` when there
    are too few distinct values above ``u`` to fit one.

    The maximum of a CUSUM with negative drift has an exponential tail, and an extreme
    quantile read from a fitted tail is far less noisy than the largest few of a thousand
    benign tasks."""
    x = np.sort(np.asarray(task_maxima, dtype=np.float64))
    n = len(x)
    k = max(TAIL_MIN, int(np.ceil(share * n)))
    if n < 2 * k:
        return None
    u = float(x[n - k - 1])
    above = x[x > u]
    if len(above) < TAIL_MIN // 2:
        return None
    beta = float(np.mean(above - u))
    if not beta > 1e-9 * (1.0 + abs(u)):
        return None
    return u, beta, len(above) / n


def _tail_score(
    stat: Array, values: Array, levels: Array, tail: tuple[float, float, float]
) -> Array:
    u, beta, p_u = tail
    score: Array = np.interp(stat, values, levels)
    above = stat > u
    if above.any():
        excess = stat[above] - u
        survival = p_u * np.exp(-excess / beta)
        # Where the tail is rarer than SCORE_ONE: 1 + decades beyond it (never saturates).
        one = beta * np.log(p_u / SCORE_ONE)
        score[above] = np.where(
            excess < one, 1.0 - survival, 1.0 + (excess - one) / (beta * np.log(10.0))
        )
    return score


# --------------------------------------------------------------------------- artifact


@dataclass
class Artifact:
    models: dict[str, TypeModel]
    sequences: SequenceModel
    alert_level: float = ALERT_LEVEL
    revoke_level: float = 1.5
    agent_type_pattern: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    sklearn_version: str = sklearn.__version__
    feature_version: int = FEATURE_VERSION
    features: tuple[str, ...] = FEATURES
    created_at: float = field(default_factory=time.time)
    model_id: str = ""

    def model_for(self, agent_type: str) -> TypeModel | None:
        return self.models.get(agent_type) or self.models.get(ANY_TYPE)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "model_id": self.model_id,
            "created_at": self.created_at,
            "sklearn_version": self.sklearn_version,
            "numpy_version": np.__version__,
            "feature_version": self.feature_version,
            "features": list(self.features),
            "thresholds": {"alert": self.alert_level, "revoke": self.revoke_level},
            "agent_type_pattern": self.agent_type_pattern,
            "agent_types": {
                name: {
                    "kind": m.kind,
                    "file": f"models/{i}.skops",
                    "n_train": m.n_train,
                    "n_val_tasks": m.n_val_tasks,
                    "calibration": {
                        "levels": m.levels.tolist(),
                        "values": m.values.tolist(),
                        "reference": m.reference,
                        "tail": None if m.tail is None else list(m.tail),
                    },
                    "feature_mean": m.mean.tolist(),
                    "feature_std": m.std.tolist(),
                    "comparison": m.comparison,
                }
                for i, (name, m) in enumerate(sorted(self.models.items()))
            },
            "sequences": {"smoothing": self.sequences.smoothing, "counts": self.sequences.counts},
            "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact (no pickle anywhere); sets and returns :attr:`model_id`."""
        import skops.io as sio

        path = Path(path)
        blobs = {
            f"models/{i}.skops": sio.dumps(m.estimator)
            for i, (_, m) in enumerate(sorted(self.models.items()))
        }
        digest = hashlib.sha256()
        self.model_id = ""
        digest.update(json.dumps(self.manifest(), sort_keys=True).encode())
        for name in sorted(blobs):
            digest.update(blobs[name])
        self.model_id = digest.hexdigest()[:16]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(self.manifest(), indent=1, sort_keys=True))
            for name, blob in blobs.items():
                zf.writestr(name, blob)
        tmp.replace(path)
        return path


def _check_manifest(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{where} is not a killswitch detector model artifact")
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: artifact format version {manifest.get('format_version')!r}, this "
            f"detector reads {ARTIFACT_FORMAT_VERSION}; retrain with `killswitch train`"
        )
    built = manifest.get("sklearn_version")
    if built != sklearn.__version__:
        raise ArtifactError(
            f"{where}: trained with scikit-learn {built}, this detector runs "
            f"{sklearn.__version__}; retrain with `killswitch train` (a model is only "
            "loaded by the scikit-learn version that built it)"
        )
    features = manifest.get("features")
    version = manifest.get("feature_version")
    if version != FEATURE_VERSION or features != list(FEATURES):
        missing = [f for f in FEATURES if f not in (features or [])]
        extra = [f for f in features or [] if f not in FEATURES]
        raise ArtifactError(
            f"{where}: feature list version {version!r} ({len(features or [])} features) "
            f"does not match this detector's version {FEATURE_VERSION} ({len(FEATURES)}"
            f" features; missing {missing}, unknown {extra}); retrain with `killswitch train`"
        )


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact; :class:`ArtifactError` says why one is refused.

    The manifest is checked (format, scikit-learn version, feature list and version)
    before any estimator is deserialised, and skops loads only :data:`TRUSTED_TYPES`
    beyond its safe defaults."""
    import skops.io as sio

    path = Path(path)
    where = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            _check_manifest(manifest, where)
            models: dict[str, TypeModel] = {}
            for name, entry in manifest["agent_types"].items():
                blob = zf.read(entry["file"])
                untrusted = set(sio.get_untrusted_types(data=blob))
                if not untrusted <= TRUSTED_TYPES:
                    raise ArtifactError(
                        f"{where}: model for {name!r} contains types this detector does not "
                        f"trust: {sorted(untrusted - TRUSTED_TYPES)}"
                    )
                estimator = sio.loads(blob, trusted=sorted(untrusted))
                if estimator_features(estimator) != len(FEATURES):
                    raise ArtifactError(
                        f"{where}: model for {name!r} expects {estimator_features(estimator)} "
                        f"features, not {len(FEATURES)}"
                    )
                cal = entry["calibration"]
                tail = cal.get("tail")
                reference = cal.get("reference")
                models[name] = TypeModel(
                    agent_type=name,
                    kind=entry["kind"],
                    estimator=estimator,
                    levels=np.asarray(cal["levels"], dtype=np.float64),
                    values=np.asarray(cal["values"], dtype=np.float64),
                    mean=np.asarray(entry["feature_mean"], dtype=np.float64),
                    std=np.asarray(entry["feature_std"], dtype=np.float64),
                    n_train=int(entry.get("n_train", 0)),
                    n_val_tasks=int(entry.get("n_val_tasks", 0)),
                    comparison=dict(entry.get("comparison", {})),
                    reference=None if reference is None else float(reference),
                    tail=None if tail is None else (float(tail[0]), float(tail[1]), float(tail[2])),
                )
    except FileNotFoundError:
        raise ArtifactError(f"model artifact {where} does not exist") from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{where} is not a readable model artifact: {exc}") from exc
    thresholds = manifest.get("thresholds", {})
    sequences = manifest.get("sequences", {})
    return Artifact(
        models=models,
        sequences=SequenceModel(
            sequences.get("counts", {}), smoothing=float(sequences.get("smoothing", 0.5))
        ),
        alert_level=float(thresholds.get("alert", ALERT_LEVEL)),
        revoke_level=float(thresholds.get("revoke", 1.5)),
        agent_type_pattern=str(manifest.get("agent_type_pattern", "")),
        training=dict(manifest.get("training", {})),
        sklearn_version=str(manifest["sklearn_version"]),
        feature_version=int(manifest["feature_version"]),
        features=tuple(manifest["features"]),
        created_at=float(manifest.get("created_at", 0.0)),
        model_id=str(manifest.get("model_id", "")),
    )


# --------------------------------------------------------------------------- the stage

_N_FEATURES: Final = len(FEATURES)


@dataclass(frozen=True, slots=True)
class Scored:
    """One scored event (what the offline evaluation reads): its raw score and the task
    score (calibrated task statistic) right after it."""

    event: UsageEvent
    agent_type: str
    raw: float
    score: float


class ModelStage:
    """Feature rows per event, scored in micro-batches, judged by the policy.

    ``add`` is the per-event (hot path) step: features into a flat float buffer.
    ``flush`` scores everything pending in one estimator call per agent type, folds the
    raw scores into each task's running statistic (a CUSUM, in event order) and returns
    the findings. The consumer flushes every ``batch_events`` rows and at the end of each
    Kafka batch (before committing, so model decisions are as durable as rule ones).
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        batch_events: int = 1024,
        alert_level: float | None = None,
        revoke_level: float | None = None,
        agent_type_pattern: str | None = None,
        keep_scores: bool = False,
    ) -> None:
        self.artifact = artifact
        self.batch_events = max(1, batch_events)
        self.alert_level = artifact.alert_level if alert_level is None else alert_level
        self.revoke_level = artifact.revoke_level if revoke_level is None else revoke_level
        pattern = agent_type_pattern or artifact.agent_type_pattern
        self.extractor = FeatureExtractor(artifact.sequences, AgentTyper(pattern))
        self._update = self.extractor.update
        self._rows = array.array("d")
        self._refs: list[tuple[UsageEvent, TaskState, TaskWindow, str]] = []
        self.keep_scores = keep_scores
        self.scored: list[Scored] = []
        self.batches = 0
        self.rows_scored = 0

    @property
    def pending(self) -> int:
        return len(self._refs)

    def add(self, event: UsageEvent, task: TaskState, agent: AgentState) -> bool:
        """Features for one event; True when a micro-batch is full (call :meth:`flush`)."""
        self._rows.extend(self._update(event, task, agent))
        refs = self._refs
        refs.append((event, task, task.features, self.extractor.last_type))  # type: ignore[arg-type]
        return len(refs) >= self.batch_events

    def flush(self) -> list[tuple[Finding, TaskState]]:
        refs = self._refs
        if not refs:
            return []
        n = len(refs)
        x = np.frombuffer(self._rows, dtype=np.float64).reshape(n, _N_FEATURES).copy()
        self._rows = array.array("d")
        self._refs = []
        self.batches += 1
        self.rows_scored += n
        raw = np.zeros(n)
        step = np.full(n, -np.inf)
        groups: dict[str, list[int]] = {}
        for i, ref in enumerate(refs):
            groups.setdefault(ref[3], []).append(i)
        models: dict[str, TypeModel | None] = {}
        for agent_type, idx in groups.items():
            model = models[agent_type] = self.artifact.model_for(agent_type)
            if model is None:
                continue
            rows = np.asarray(idx)
            r = model.anomaly(x[rows])
            raw[rows] = r
            step[rows] = model.accumulate(r)
        # The task statistic, in event order: s = max(0, s + step) (a model without a
        # reference scores each event alone: s = step).
        stat = np.empty(n)
        steps = step.tolist()
        for i in range(n):
            window = refs[i][2]
            s = window.cusum + steps[i]
            if s < 0.0:
                s = 0.0
            window.cusum = s
            stat[i] = s
        score = np.zeros(n)
        for agent_type, idx in groups.items():
            model = models[agent_type]
            if model is None:
                continue
            rows = np.asarray(idx)
            if model.reference is None:
                score[rows] = model.calibrate(raw[rows])
            else:
                score[rows] = model.calibrate(stat[rows])
        if self.keep_scores:
            self.scored.extend(
                Scored(ref[0], ref[3], float(raw[i]), float(score[i])) for i, ref in enumerate(refs)
            )
        found: list[tuple[Finding, TaskState]] = []
        alert_level, revoke_level = self.alert_level, self.revoke_level
        # Rules ran (and sources were seen) at ``add``: a task's signals are fixed here.
        known: dict[int, list[str]] = {}
        revoke_id, alert_id = MODEL_REVOKE.id, MODEL_ALERT.id
        for i in np.flatnonzero(score >= alert_level).tolist():
            event, task, window, agent_type = refs[i]
            s = float(score[i])
            if s > window.max_score:
                window.max_score = s
            fired = task.fired
            if revoke_id in fired or (s < revoke_level and alert_id in fired):
                continue
            model = models[agent_type]
            assert model is not None
            signals: list[str] = []
            if s >= revoke_level:
                signals = known.get(id(task), [])
                if id(task) not in known:
                    signals = known[id(task)] = self.signals(task, window)
            if signals:
                rule = MODEL_REVOKE
            elif MODEL_ALERT.id in fired:
                continue
            else:
                rule = MODEL_ALERT
            fired.add(rule.id)
            found.append(
                (
                    self._finding(rule, event, agent_type, model, x[i], float(raw[i]), s, signals),
                    task,
                )
            )
        return found

    @staticmethod
    def signals(task: TaskState, window: TaskWindow) -> list[str]:
        """Independent deterministic signals on the task (any one allows a revocation)."""
        # A use within the revocation's propagation window is not the agent's doing.
        found = [f"rule:{rule}" for rule in sorted(task.fired - MODEL_RULE_IDS - NOT_SIGNALS)]
        if window.novel_source:
            found.append("first_seen_source")
        if len(window.sources) >= 2:
            found.append("two_sources")
        if window.denied >= 3 and window.denied * 4 >= window.events:
            found.append("denied_rate")
        return found

    def _finding(
        self,
        rule: Rule,
        event: UsageEvent,
        agent_type: str,
        model: TypeModel,
        row: Array,
        raw: float,
        score: float,
        signals: list[str],
    ) -> Finding:
        artifact = self.artifact
        verb = "revoked: " if rule is MODEL_REVOKE else ""
        summary = (
            f"{verb}anomaly score {score:.4f} for agent type {model.agent_type!r} "
            f"(alert >= {self.alert_level:g}, revoke >= {self.revoke_level:g})"
        )
        if signals:
            summary += f", corroborated by {', '.join(signals)}"
        return rule.finding(
            event,
            summary,
            score=round(score, 6),
            raw_score=round(raw, 6),
            alert_level=self.alert_level,
            revoke_level=self.revoke_level,
            agent_type=agent_type,
            model_agent_type=model.agent_type,
            features=model.explain(row.tolist()),
            corroborated_by=signals,
            model={
                "id": artifact.model_id,
                "kind": model.kind,
                "feature_version": artifact.feature_version,
                "sklearn_version": artifact.sklearn_version,
                "rule": rule.id,
            },
        )


def describe_artifact(artifact: Artifact) -> str:
    """Human summary (CLI output)."""
    out = io.StringIO()
    out.write(
        f"model {artifact.model_id} (scikit-learn {artifact.sklearn_version}, features "
        f"v{artifact.feature_version}, alert >= {artifact.alert_level:g}, revoke >= "
        f"{artifact.revoke_level:g})\n"
    )
    for name, m in sorted(artifact.models.items()):
        out.write(
            f"  {name:<16} {m.kind:<17} trained on {m.n_train:,} events, calibrated on "
            f"{m.n_val_tasks:,} benign tasks\n"
        )
    return out.getvalue()
