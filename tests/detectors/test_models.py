"""The model: training, artifact round-trip and refusal, fast scoring, micro-batches, policy."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sklearn

from detectors.features import FEATURES
from detectors.models import (
    MODEL_ALERT,
    MODEL_REVOKE,
    Artifact,
    ArtifactError,
    ModelStage,
    TypeModel,
    calibration,
    fit_isolation_forest,
    fit_ocsvm,
    fit_tail,
    load_artifact,
)
from detectors.rules import Thresholds
from detectors.rules import evaluate as evaluate_rules
from detectors.state import Store
from detectors.traffic import MODEL_SCENARIOS, Traffic, generate
from detectors.train import evaluate, train
from detectors.train import main as train_main
from service.config import Settings
from service.kernel.events import TaskEvent, UsageEvent


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return generate(seed=11, tasks=1200, attack_rate=0.08)


@pytest.fixture(scope="module")
def artifact(traffic: Traffic) -> Artifact:
    return train(traffic, seed=0)


@pytest.fixture(scope="module")
def saved(artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifact.save(tmp_path_factory.mktemp("model") / "model.ksm")


def _rows(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, len(FEATURES)))


# --------------------------------------------------------------------------- training


def test_training_records_choice_and_calibration(artifact: Artifact) -> None:
    assert {"coder", "researcher", "support-bot", "finance", "*"} <= set(artifact.models)
    for model in artifact.models.values():
        assert model.kind in ("isolation_forest", "nystroem_ocsvm")
        assert model.comparison["chosen"] == model.kind
        assert set(model.comparison) >= {"isolation_forest", "nystroem_ocsvm", "chosen_by"}
        assert model.n_val_tasks > 50
        assert np.all(np.diff(model.values) >= 0)
        assert model.reference is not None
    assert artifact.sequences.counts["coder"]["^"]


def test_calibration_maps_benign_maxima_to_quantiles() -> None:
    maxima = np.arange(1.0, 1001.0)
    levels, values = calibration(maxima)
    model = TypeModel("t", "isolation_forest", None, levels, values, np.zeros(1), np.ones(1))
    score = model.calibrate(np.asarray([0.5, 500.5, 1000.0, 1000.0 + 499.5]))
    assert score[0] == 0.0
    assert score[1] == pytest.approx(0.5, abs=1e-3)
    assert score[2] == pytest.approx(1.0)
    assert score[3] == pytest.approx(2.0)  # one benign spread (max - median) beyond the max


def test_tail_calibration_extrapolates_beyond_the_largest_benign_task() -> None:
    rng = np.random.default_rng(0)
    maxima = rng.exponential(2.0, size=4000)
    tail = fit_tail(maxima)
    assert tail is not None
    u, beta, p_u = tail
    assert beta == pytest.approx(2.0, rel=0.2)  # the exponential's scale, from its tail
    assert p_u == pytest.approx(0.05, abs=0.01)
    levels, values = calibration(maxima)
    model = TypeModel(
        "t", "isolation_forest", None, levels, values, np.zeros(1), np.ones(1), tail=tail
    )
    # Inside the body: the empirical quantile. In the tail: 1 - P(benign task > x).
    assert model.calibrate(np.asarray([float(np.median(maxima))]))[0] == pytest.approx(
        0.5, abs=0.01
    )
    q999 = 2.0 * np.log(1000.0)
    assert model.calibrate(np.asarray([q999]))[0] == pytest.approx(0.999, abs=5e-4)
    # 1 at a tail probability of 1e-4, then one unit per further factor of 10.
    x1 = u + beta * np.log(p_u / 1e-4)
    score = model.calibrate(np.asarray([x1 - 1e-6, x1 + 1e-6, x1 + beta * np.log(10.0)]))
    assert score[0] == pytest.approx(0.9999, abs=1e-6)
    assert score[1] == pytest.approx(1.0, abs=1e-6)
    assert score[2] == pytest.approx(2.0, abs=1e-6)
    assert np.all(np.diff(model.calibrate(np.linspace(0, 60, 500))) >= 0)  # monotone
    assert fit_tail(np.zeros(1000)) is None  # nothing to fit: empirical quantiles only


def test_task_score_accumulates_over_a_task(artifact: Artifact) -> None:
    """The live stage's task statistic is the CUSUM the training calibrated on."""
    model = artifact.models["coder"]
    assert model.reference is not None
    assert model.tail is not None
    raw = np.asarray([model.reference + 1.0] * 3 + [model.reference - 10.0])
    steps = model.accumulate(raw)
    np.testing.assert_allclose(steps, [1.0, 1.0, 1.0, -10.0])
    from detectors.train import _cusum

    np.testing.assert_allclose(
        _cusum(["a", "b", "a", "a"], np.arange(4), steps), [1.0, 1.0, 2.0, 0.0]
    )


@pytest.mark.parametrize("kind", ["isolation_forest", "nystroem_ocsvm"])
def test_fast_scoring_equals_sklearn(kind: str) -> None:
    x = _rows(2000)
    est = fit_isolation_forest(x) if kind == "isolation_forest" else fit_ocsvm(x)
    model = TypeModel("t", kind, est, np.zeros(2), np.ones(2), np.zeros(1), np.ones(1))  # type: ignore[arg-type]
    assert model.compiled.fast
    probe = _rows(500, seed=1) * 3
    expected = -est.score_samples(probe)
    if kind == "nystroem_ocsvm":
        expected = -np.log(np.maximum(-expected, 1e-12))
    np.testing.assert_allclose(model.anomaly(probe), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- artifact


def test_artifact_round_trip(artifact: Artifact, saved: Path) -> None:
    loaded = load_artifact(saved)
    assert loaded.model_id == artifact.model_id != ""
    assert loaded.sklearn_version == sklearn.__version__
    assert loaded.features == FEATURES
    assert loaded.alert_level == artifact.alert_level
    assert set(loaded.models) == set(artifact.models)
    x = _rows(400)
    for name, model in artifact.models.items():
        again = loaded.models[name]
        assert again.kind == model.kind
        np.testing.assert_allclose(again.anomaly(x), model.anomaly(x))
        np.testing.assert_allclose(
            again.calibrate(model.anomaly(x)), model.calibrate(model.anomaly(x))
        )
        assert again.reference == model.reference
        assert again.tail == model.tail
    assert loaded.sequences.counts == artifact.sequences.counts
    with zipfile.ZipFile(saved) as zf:
        names = zf.namelist()
        assert "manifest.json" in names
        assert not [n for n in names if n.endswith((".pkl", ".pickle", ".joblib"))]


def _rewrite(src: Path, dst: Path, change: dict[str, object]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "manifest.json":
                manifest = json.loads(data)
                manifest.update(change)
                data = json.dumps(manifest).encode()
            zout.writestr(item, data)
    return dst


def test_other_sklearn_version_is_refused(saved: Path, tmp_path: Path) -> None:
    bad = _rewrite(saved, tmp_path / "old.ksm", {"sklearn_version": "1.2.0"})
    with pytest.raises(ArtifactError, match=r"scikit-learn 1\.2\.0.*retrain"):
        load_artifact(bad)


def test_other_feature_list_is_refused(saved: Path, tmp_path: Path) -> None:
    features = [*FEATURES[:-1], "something_else"]
    bad = _rewrite(saved, tmp_path / "features.ksm", {"features": features})
    with pytest.raises(ArtifactError, match=r"feature list.*unknown \['something_else'\]"):
        load_artifact(bad)
    bad = _rewrite(saved, tmp_path / "version.ksm", {"feature_version": 99})
    with pytest.raises(ArtifactError, match="feature list version 99"):
        load_artifact(bad)


def test_garbage_and_missing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope.ksm")
    junk = tmp_path / "junk.ksm"
    junk.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(ArtifactError, match="not a readable model artifact"):
        load_artifact(junk)


def test_detector_refuses_a_mismatched_artifact(saved: Path, tmp_path: Path) -> None:
    from detectors.consumer import Detector

    bad = _rewrite(saved, tmp_path / "old.ksm", {"sklearn_version": "0.0"})
    settings = Settings(kafka_bootstrap="127.0.0.1:1", detector_model=str(bad))
    with pytest.raises(ArtifactError, match=r"scikit-learn 0\.0"):
        Detector(settings, service_url="http://127.0.0.1:1", token="x")
    ok = Detector(
        Settings(kafka_bootstrap="127.0.0.1:1", detector_model=str(saved)),
        service_url="http://127.0.0.1:1",
        token="x",
    )
    assert ok.model is not None


def test_settings_parse_model_thresholds() -> None:
    settings = Settings.from_env(
        {"KS_DETECTOR_MODEL_ALERT": "0.99", "KS_DETECTOR_MODEL_BATCH": "64"}
    )
    assert settings.detector_model_alert == 0.99
    assert settings.detector_model_batch == 64


# --------------------------------------------------------------------------- the stage


def _replay(stage: ModelStage, traffic: Traffic) -> list[tuple[str, str]]:
    store = Store(denied_burst=10)
    found: list[tuple[str, str]] = []
    for event in traffic.stream():
        if isinstance(event, TaskEvent):
            store.apply_task_event(event)
            continue
        assert isinstance(event, UsageEvent)
        task, agent = store.observe(event, 0, event.at)
        evaluate_rules(event, task, agent, Thresholds())
        if stage.add(event, task, agent):
            found += [(f.rule.id, f.task_id) for f, _ in stage.flush()]
    found += [(f.rule.id, f.task_id) for f, _ in stage.flush()]
    return found


def test_scoring_is_micro_batched(artifact: Artifact) -> None:
    small = generate(seed=5, tasks=60, attack_rate=0.0)
    stage = ModelStage(artifact, batch_events=256)
    _replay(stage, small)
    assert stage.rows_scored == len(small.events)
    assert stage.batches == -(-len(small.events) // 256)  # ceil: one call per batch


def test_policy_alerts_once_and_revokes_only_when_corroborated(
    artifact: Artifact, traffic: Traffic
) -> None:
    # Levels so low that everything alerts and would revoke: only corroborated tasks may.
    stage = ModelStage(artifact, alert_level=0.0, revoke_level=0.0)
    found = _replay(stage, traffic)
    alerted = [t for r, t in found if r == MODEL_ALERT.id]
    assert len(alerted) == len(set(alerted))  # one alert per task
    revoked = {t for r, t in found if r == MODEL_REVOKE.id}
    labels = traffic.labels
    # Every revoked benign task had some deterministic signal: never from the score alone.
    for task_id in revoked:
        if labels[task_id].scenario is None:
            pytest.fail(f"benign task {task_id} revoked")  # generator's benign: 1 source, no rule


def test_findings_carry_their_evidence(artifact: Artifact, traffic: Traffic) -> None:
    report = evaluate(artifact, traffic)
    model_findings = [f for f, _ in report.findings if f.rule.id == MODEL_ALERT.id]
    assert model_findings
    evidence = model_findings[0].evidence
    assert evidence["score"] >= artifact.alert_level
    assert {"raw_score", "alert_level", "revoke_level", "agent_type", "corroborated_by"} <= set(
        evidence
    )
    assert len(evidence["features"]) == 5
    assert {"name", "value", "z"} == set(evidence["features"][0])
    assert evidence["model"]["kind"] in ("isolation_forest", "nystroem_ocsvm")
    assert evidence["model"]["feature_version"] == artifact.feature_version


def test_in_scope_attacks_are_seen_on_fresh_traffic(artifact: Artifact) -> None:
    """A loose floor (small training set); the measured figures are in docs/detector.md."""
    report = evaluate(artifact, generate(seed=12, tasks=1200, attack_rate=0.08))
    in_scope = [report.recall[s] for s in MODEL_SCENARIOS]
    assert sum(in_scope) / len(in_scope) >= 0.7, report.table()
    assert report.false_revocations == 0, report.table()
    for scenario in ("replay_new_source", "concurrent_two_sources", "use_after_end"):
        assert report.recall[scenario] == 1.0, report.table()


# --------------------------------------------------------------------------- command line


def test_train_command_writes_a_loadable_artifact(tmp_path: Path) -> None:
    from detectors.traffic import write_events

    events = tmp_path / "events.jsonl"
    write_events(generate(seed=3, tasks=300, attack_rate=0.05), events)
    out = tmp_path / "m.ksm"
    assert train_main(["train", "--events", str(events), "-o", str(out)]) == 0
    assert load_artifact(out).training["source"] == str(events)
    assert train_main(["evaluate", "--model", str(out), "--events", str(events)]) == 0
    assert train_main(["train", "--events", str(tmp_path / "missing"), "-o", str(out)]) == 2
