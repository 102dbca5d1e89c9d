"""Keep docs/grafana-dashboard.json true to the code: every metric a panel queries is one
the service (service/metrics.py) or the detector (detectors/metrics.py) exposes, under
the name Prometheus scrapes (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for
histograms), and every label a query groups by is a label of a metric it reads."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from detectors.metrics import DetectorMetrics
from service.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
_METRIC = re.compile(r"\bkillswitch_[a-z0-9_]+\b")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


@cache
def _exposed() -> dict[str, set[str]]:
    """Scraped sample name -> the labels it carries."""
    names: dict[str, set[str]] = {}
    registries: list[CollectorRegistry] = [Metrics().registry, DetectorMetrics().registry]
    for registry in registries:
        for collector in list(registry._collector_to_names):  # every family, even unset
            for family in collector.describe():
                labels = set(getattr(collector, "_labelnames", ()))
                for suffix in _SUFFIXES[family.type]:
                    names[family.name + suffix] = labels | (
                        {"le"} if suffix == "_bucket" else set()
                    )
    return names


@cache
def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panels() -> list[dict[str, Any]]:
    out = []
    for panel in _dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels()
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_queries_something() -> None:
    assert len(_exprs()) >= 10
    assert _dashboard()["uid"]


@pytest.mark.parametrize(("title", "expr"), _exprs(), ids=[t for t, _ in _exprs()])
def test_every_queried_metric_exists(title: str, expr: str) -> None:
    used = _METRIC.findall(expr)
    assert used, f"panel {title!r} queries no killswitch metric: {expr}"
    for name in used:
        assert name in _exposed(), (
            f"panel {title!r} queries {name}, which neither service/metrics.py nor "
            f"detectors/metrics.py exposes (known: {sorted(_exposed())})"
        )
    labels = set().union(*(_exposed()[name] for name in used))
    for group in _BY.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in labels, f"panel {title!r} groups by {label!r}, not a label of {used}"


def test_the_dashboard_covers_what_issue_6_asks_for() -> None:
    used = {name for _, expr in _exprs() for name in _METRIC.findall(expr)}
    for required in (
        "killswitch_credentials_issued_total",
        "killswitch_issuance_seconds_bucket",
        "killswitch_revocations_total",
        "killswitch_alerts_total",
        "killswitch_kill_latency_seconds_bucket",
        "killswitch_detector_events_total",
        "killswitch_detector_decision_seconds_bucket",
        "killswitch_detector_consumer_lag",
    ):
        assert required in used, f"no panel charts {required}"


def test_panels_are_well_formed() -> None:
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    inputs = {i["name"] for i in _dashboard()["__inputs"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].strip("${}") in inputs, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
