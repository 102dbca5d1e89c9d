"""Configuration: one frozen object, read from ``KS_*`` environment variables once.

Nothing else in killswitch reads ``os.environ``; components receive a :class:`Settings`
(or the few fields they need). Every field is documented below and in
docs/operations.md: name, environment variable, default.

Secrets are wrapped in :class:`Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from service.kernel.errors import ClientError


class Secret:
    """A string that never appears in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


SIGNING_ALGORITHMS = ("EdDSA", "ES256")
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob killswitch has. ``env`` metadata names the variable that sets it."""

    data_dir: Path = field(
        default=Path(".killswitch"),
        metadata={"env": "KS_DATA_DIR", "doc": "Where the SQLite file and signing keys live."},
    )
    database_url: str = field(
        default="",
        metadata={
            "env": "KS_DATABASE_URL",
            "doc": "sqlite:///path/to.db or postgresql://user:pass@host:port/db; "
            "empty means sqlite:///<data_dir>/killswitch.db",
        },
    )
    key_dir: Path | None = field(
        default=None,
        metadata={"env": "KS_KEY_DIR", "doc": "Signing key directory; default <data_dir>/keys."},
    )
    host: str = field(default="127.0.0.1", metadata={"env": "KS_HOST", "doc": "Bind address."})
    port: int = field(default=8080, metadata={"env": "KS_PORT", "doc": "Bind port."})
    issuer: str = field(
        default="",
        metadata={
            "env": "KS_ISSUER",
            "doc": "The `iss` of every credential and the RFC 8414 issuer; "
            "empty means http://<host>:<port>",
        },
    )
    trust_domain: str = field(
        default="killswitch.local",
        metadata={"env": "KS_TRUST_DOMAIN", "doc": "SPIFFE trust domain of task identities."},
    )
    signing_alg: str = field(
        default="EdDSA",
        metadata={"env": "KS_SIGNING_ALG", "doc": "EdDSA (Ed25519) or ES256 (P-256)."},
    )
    credential_ttl: int = field(
        default=300,
        metadata={
            "env": "KS_CREDENTIAL_TTL",
            "doc": "Lifetime of one credential in seconds (always capped by the task deadline).",
        },
    )
    default_task_ttl: int = field(
        default=900,
        metadata={"env": "KS_DEFAULT_TASK_TTL", "doc": "Task lifetime when the request omits it."},
    )
    max_task_ttl: int = field(
        default=86_400,
        metadata={"env": "KS_MAX_TASK_TTL", "doc": "Upper bound on any task lifetime (seconds)."},
    )
    leeway: int = field(
        default=5,
        metadata={"env": "KS_LEEWAY", "doc": "Clock skew tolerated on exp/nbf (seconds)."},
    )
    max_body_bytes: int = field(
        default=65_536,
        metadata={"env": "KS_MAX_BODY_BYTES", "doc": "Largest accepted request body."},
    )
    bootstrap_admin_token: Secret | None = field(
        default=None,
        metadata={
            "env": "KS_BOOTSTRAP_ADMIN_TOKEN",
            "doc": "If set and no admin exists, this token becomes the first admin's; "
            "otherwise one is generated and printed once.",
        },
    )
    bootstrap_detector_token: Secret | None = field(
        default=None,
        metadata={
            "env": "KS_BOOTSTRAP_DETECTOR_TOKEN",
            "doc": "If set and no operator named `detector` exists, one with role detector "
            "and this token is created at start (how `killswitch up` and compose.yaml wire "
            "the detector in).",
        },
    )
    log_level: str = field(default="info", metadata={"env": "KS_LOG_LEVEL", "doc": "Log level."})

    # -- Kafka (docs/events.md, docs/kafka.md) -------------------------------------------
    kafka_bootstrap: str = field(
        default="",
        metadata={
            "env": "KS_KAFKA_BOOTSTRAP",
            "doc": "host:port[,host:port] of the Kafka cluster; empty disables publishing "
            "(revocations still reach the SSE stream and introspection).",
        },
    )
    kafka_usage_topic: str = field(
        default="killswitch.usage.v1",
        metadata={"env": "KS_KAFKA_USAGE_TOPIC", "doc": "UsageEvent topic (key: agent id)."},
    )
    kafka_tasks_topic: str = field(
        default="killswitch.tasks.v1",
        metadata={"env": "KS_KAFKA_TASKS_TOPIC", "doc": "TaskEvent topic (key: task id)."},
    )
    kafka_revocations_topic: str = field(
        default="killswitch.revocations.v1",
        metadata={
            "env": "KS_KAFKA_REVOCATIONS_TOPIC",
            "doc": "RevocationEvent topic, compacted, one partition (guards replay it).",
        },
    )
    kafka_alerts_topic: str = field(
        default="killswitch.alerts.v1",
        metadata={"env": "KS_KAFKA_ALERTS_TOPIC", "doc": "AlertEvent topic (key: agent id)."},
    )
    kafka_dlq_topic: str = field(
        default="killswitch.usage.dlq.v1",
        metadata={"env": "KS_KAFKA_DLQ_TOPIC", "doc": "Undecodable usage events, with reason."},
    )
    kafka_partitions: int = field(
        default=6,
        metadata={
            "env": "KS_KAFKA_PARTITIONS",
            "doc": "Partitions for usage, tasks, alerts and DLQ topics when killswitch "
            "creates them.",
        },
    )
    kafka_replication_factor: int = field(
        default=1,
        metadata={"env": "KS_KAFKA_REPLICATION_FACTOR", "doc": "Replication of created topics."},
    )
    kafka_security_protocol: str = field(
        default="PLAINTEXT",
        metadata={
            "env": "KS_KAFKA_SECURITY_PROTOCOL",
            "doc": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
        },
    )
    kafka_sasl_mechanism: str = field(
        default="",
        metadata={
            "env": "KS_KAFKA_SASL_MECHANISM",
            "doc": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL_* protocol).",
        },
    )
    kafka_sasl_username: str = field(
        default="", metadata={"env": "KS_KAFKA_SASL_USERNAME", "doc": "SASL user name."}
    )
    kafka_sasl_password: Secret | None = field(
        default=None, metadata={"env": "KS_KAFKA_SASL_PASSWORD", "doc": "SASL password."}
    )
    kafka_ssl_cafile: str = field(
        default="",
        metadata={"env": "KS_KAFKA_SSL_CAFILE", "doc": "CA bundle for SSL/SASL_SSL."},
    )
    kafka_ssl_certfile: str = field(
        default="",
        metadata={"env": "KS_KAFKA_SSL_CERTFILE", "doc": "Client certificate (mutual TLS)."},
    )
    kafka_ssl_keyfile: str = field(
        default="",
        metadata={"env": "KS_KAFKA_SSL_KEYFILE", "doc": "Client key (mutual TLS)."},
    )
    kafka_fetch_max_wait_ms: int = field(
        default=5,
        metadata={
            "env": "KS_KAFKA_FETCH_MAX_WAIT_MS",
            "doc": "Consumer long-poll bound; small = low kill latency (aiokafka's 500 "
            "default costs ~250 ms p99 on loopback).",
        },
    )
    kafka_session_timeout_ms: int = field(
        default=10_000,
        metadata={"env": "KS_KAFKA_SESSION_TIMEOUT_MS", "doc": "Consumer group session timeout."},
    )
    kafka_heartbeat_interval_ms: int = field(
        default=3_000,
        metadata={"env": "KS_KAFKA_HEARTBEAT_INTERVAL_MS", "doc": "Consumer heartbeat interval."},
    )
    alerts_group_id: str = field(
        default="killswitch-service-alerts",
        metadata={
            "env": "KS_ALERTS_GROUP_ID",
            "doc": "Consumer group in which the service reads the alerts topic into its "
            "database (with KS_KAFKA_BOOTSTRAP set). Replicas sharing one database share "
            "the group.",
        },
    )

    # -- detector (docs/detector.md) ------------------------------------------------------
    detector_group_id: str = field(
        default="killswitch-detector",
        metadata={"env": "KS_DETECTOR_GROUP_ID", "doc": "Consumer group of the detectors."},
    )
    detector_metrics_host: str = field(
        default="127.0.0.1",
        metadata={"env": "KS_DETECTOR_METRICS_HOST", "doc": "Bind address of /metrics, /livez."},
    )
    detector_metrics_port: int = field(
        default=9464,
        metadata={
            "env": "KS_DETECTOR_METRICS_PORT",
            "doc": "Port of the detector's /metrics, /livez and /readyz; 0 picks a free one.",
        },
    )
    detector_max_batch: int = field(
        default=500,
        metadata={"env": "KS_DETECTOR_MAX_BATCH", "doc": "Most usage records per batch."},
    )
    detector_poll_ms: int = field(
        default=20,
        metadata={"env": "KS_DETECTOR_POLL_MS", "doc": "getmany() timeout per loop turn (ms)."},
    )
    detector_rate_burst: int = field(
        default=2,
        metadata={
            "env": "KS_DETECTOR_RATE_BURST",
            "doc": "limits.rate: a 1 s window may hold max_rate x this many calls (a 10 s "
            "window max_rate x 10).",
        },
    )
    detector_denied_burst: int = field(
        default=10,
        metadata={
            "env": "KS_DETECTOR_DENIED_BURST",
            "doc": "probing.denied_burst: this many denied requests of one task ...",
        },
    )
    detector_denied_window_s: int = field(
        default=10,
        metadata={"env": "KS_DETECTOR_DENIED_WINDOW_S", "doc": "... within this many seconds."},
    )
    detector_task_grace_s: int = field(
        default=600,
        metadata={
            "env": "KS_DETECTOR_TASK_GRACE_S",
            "doc": "Keep a closed or expired task's state this long before evicting it.",
        },
    )
    detector_max_tasks: int = field(
        default=1_000_000,
        metadata={
            "env": "KS_DETECTOR_MAX_TASKS",
            "doc": "Hard bound on tasks held in memory (ended, then least recently seen, "
            "go first).",
        },
    )
    detector_shutdown_grace_s: int = field(
        default=10,
        metadata={
            "env": "KS_DETECTOR_SHUTDOWN_GRACE_S",
            "doc": "On stop, how long a batch's pending actions may still retry before the "
            "detector exits without committing it.",
        },
    )
    detector_test_pause_before_commit_ms: int = field(
        default=0,
        metadata={
            "env": "KS_DETECTOR_TEST_PAUSE_BEFORE_COMMIT_MS",
            "doc": "Testing only: sleep between a batch's durable actions and its commit "
            "(the crash-safety test kills the detector there).",
        },
    )
    detector_model: str = field(
        default="",
        metadata={
            "env": "KS_DETECTOR_MODEL",
            "doc": "Path of a model artifact (`killswitch train`); empty = rules only. A "
            "mismatched artifact (scikit-learn version, feature list) stops the detector.",
        },
    )
    detector_model_alert: float = field(
        default=0.0,
        metadata={
            "env": "KS_DETECTOR_MODEL_ALERT",
            "doc": "Calibrated score at which the model alerts (0 = the artifact's, "
            "0.999 by default: ~1 false alert per 1,000 benign tasks).",
        },
    )
    detector_model_revoke: float = field(
        default=0.0,
        metadata={
            "env": "KS_DETECTOR_MODEL_REVOKE",
            "doc": "Calibrated score at which the model revokes, if a deterministic signal "
            "agrees (0 = the artifact's, 1.5 by default).",
        },
    )
    detector_model_batch: int = field(
        default=1024,
        metadata={
            "env": "KS_DETECTOR_MODEL_BATCH",
            "doc": "Most events per model micro-batch (a Kafka batch always ends one).",
        },
    )
    detector_agent_type_pattern: str = field(
        default="",
        metadata={
            "env": "KS_DETECTOR_AGENT_TYPE_PATTERN",
            "doc": "Regex whose `type` group maps an agent id to its agent type (empty = the "
            "artifact's, else strip a trailing id token: `coder-07` -> `coder`).",
        },
    )
    # -- end detector ---------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'killswitch.db'}"

    @property
    def effective_key_dir(self) -> Path:
        return self.key_dir or self.data_dir / "keys"

    @property
    def effective_issuer(self) -> str:
        return (self.issuer or f"http://{self.host}:{self.port}").rstrip("/")

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, f.metadata["env"], raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.signing_alg not in SIGNING_ALGORITHMS:
            raise ClientError(
                f"KS_SIGNING_ALG must be one of {', '.join(SIGNING_ALGORITHMS)}, "
                f"not {self.signing_alg!r}"
            )
        for name in ("credential_ttl", "default_task_ttl", "max_task_ttl", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ClientError(f"{name} must be positive")
        if self.default_task_ttl > self.max_task_ttl:
            raise ClientError("KS_DEFAULT_TASK_TTL must not exceed KS_MAX_TASK_TTL")
        if self.kafka_security_protocol not in KAFKA_PROTOCOLS:
            raise ClientError(
                f"KS_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_PROTOCOLS)}"
            )
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ClientError("KS_KAFKA_SASL_MECHANISM is required with a SASL_* protocol")
        url = self.effective_database_url
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ClientError(
                "KS_DATABASE_URL must start with sqlite:/// or postgresql:// "
                f"(got {url.split(':', 1)[0]}:...)"
            )


_INT_FIELDS = {
    "port",
    "kafka_partitions",
    "kafka_replication_factor",
    "kafka_fetch_max_wait_ms",
    "kafka_session_timeout_ms",
    "kafka_heartbeat_interval_ms",
    "credential_ttl",
    "default_task_ttl",
    "max_task_ttl",
    "leeway",
    "max_body_bytes",
}
# -- detector
_INT_FIELDS |= {
    "detector_metrics_port",
    "detector_max_batch",
    "detector_poll_ms",
    "detector_rate_burst",
    "detector_denied_burst",
    "detector_denied_window_s",
    "detector_task_grace_s",
    "detector_max_tasks",
    "detector_shutdown_grace_s",
    "detector_test_pause_before_commit_ms",
    "detector_model_batch",
}
_FLOAT_FIELDS = {"detector_model_alert", "detector_model_revoke"}
# -- end detector


def _coerce(name: str, env: str, raw: str) -> Any:
    if name in _INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ClientError(f"{env} must be an integer, got {raw!r}") from None
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise ClientError(f"{env} must be a number, got {raw!r}") from None
    if name in ("data_dir", "key_dir"):
        return Path(raw)
    if name in ("bootstrap_admin_token", "bootstrap_detector_token", "kafka_sasl_password"):
        return Secret(raw)
    return raw


def describe() -> list[tuple[str, str, str, str]]:
    """(field, env var, default, doc) for every setting: used by docs and ``--help``."""
    rows = []
    for f in fields(Settings):
        default = "" if f.default is None else str(f.default)
        rows.append((f.name, f.metadata["env"], default, f.metadata["doc"]))
    return rows
