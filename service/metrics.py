"""Prometheus metrics of the control plane, in a registry owned by one running service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.issued = Counter(
            "killswitch_credentials_issued", "Credentials issued on task open", registry=r
        )
        self.renewed = Counter(
            "killswitch_credentials_renewed", "Credentials issued on renewal", registry=r
        )
        self.revocations = Counter(
            "killswitch_revocations",
            "Revocations recorded",
            ["target", "source"],
            registry=r,
        )
        self.tasks_completed = Counter(
            "killswitch_tasks_completed", "Tasks completed by their agent", registry=r
        )
        self.issue_latency = Histogram(
            "killswitch_issuance_seconds",
            "Time to issue a credential inside the service (claims, sign, record)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.introspections = Counter(
            "killswitch_introspections", "RFC 7662 introspections", ["active"], registry=r
        )
        self.auth_failures = Counter(
            "killswitch_auth_failures", "Rejected authentications", ["kind"], registry=r
        )
        self.alerts = Counter(
            "killswitch_alerts",
            "Alerts stored from the alerts topic (each alert_id once), by severity and rule",
            ["severity", "rule"],
            registry=r,
        )
        self.alert_records = Counter(
            "killswitch_alert_records",
            "Records read from the alerts topic, by outcome (stored, duplicate, rejected)",
            ["outcome"],
            registry=r,
        )
        self.kill_latency = Histogram(
            "killswitch_kill_latency_seconds",
            "From the offending use (UsageEvent.at, as the alert's evidence.event_at) to the "
            "detector's revocation committing (its created_at); observed once per alert "
            "whose revocation the detector created",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.signing_keys = Gauge(
            "killswitch_signing_keys_published", "Keys currently in the JWKS", registry=r
        )
