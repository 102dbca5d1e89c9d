"""compose.yaml cannot run here (no Docker engine), so it is parsed and checked against
the settings the code actually reads: a renamed setting breaks this test, not a deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from service.config import describe

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {env for _name, env, _default, _doc in describe()}
CLIENT_ENV = {"KS_URL", "KS_TOKEN"}  # read by the CLI and `python -m detectors`


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_the_whole_system_is_there_with_health_checks() -> None:
    services = _compose()["services"]
    assert set(services) == {"kafka", "postgres", "service", "detector"}
    for name, spec in services.items():
        assert "healthcheck" in spec, name
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["postgres"]["image"].startswith("postgres:")


def test_every_ks_variable_is_one_the_code_reads() -> None:
    for name, spec in _compose()["services"].items():
        for key in spec.get("environment", {}):
            if key.startswith("KS_"):
                assert key in SETTINGS_ENV | CLIENT_ENV, f"{name}: {key} is read by nothing"


def test_wiring_matches_the_settings() -> None:
    services = _compose()["services"]
    service_env = services["service"]["environment"]
    detector_env = services["detector"]["environment"]
    assert service_env["KS_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in service_env["KS_DATABASE_URL"]
    assert service_env["KS_KAFKA_BOOTSTRAP"] == detector_env["KS_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert (
        service_env["KS_KAFKA_BOOTSTRAP"]
        in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    # The service publishes its port, and the detector talks to it there.
    port = service_env["KS_PORT"]
    assert f"{port}:{port}" in services["service"]["ports"]
    assert detector_env["KS_URL"] == f"http://service:{port}"
    # The detector's token is the one the service bootstraps as its detector operator.
    assert detector_env["KS_TOKEN"] == service_env["KS_BOOTSTRAP_DETECTOR_TOKEN"]
    metrics_port = detector_env["KS_DETECTOR_METRICS_PORT"]
    assert f"{metrics_port}:{metrics_port}" in services["detector"]["ports"]
    assert metrics_port in " ".join(services["detector"]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["service"]["healthcheck"]["test"])
    assert services["detector"]["command"] == ["python", "-m", "detectors"]
    assert services["service"]["command"][:2] == ["killswitch", "serve"]


def test_dockerfile_installs_both_packages() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY service ./service" in dockerfile
    assert "COPY detectors ./detectors" in dockerfile
    assert "USER killswitch" in dockerfile  # never run as root
