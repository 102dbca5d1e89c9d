"""The streaming detector: consumes usage events, keeps per-task and per-agent state,
applies deterministic rules, and revokes or alerts (docs/detector.md).

    state.py     what the detector knows (bounded)     rules.py    the rules (pure)
    actions.py   revoke / alert / dead-letter (durable) consumer.py the loop, commits
    metrics.py   Prometheus metrics, /livez /readyz    __main__.py ``python -m detectors``

It imports nothing from litestar or the database: it reaches the service over HTTP.
"""

from detectors.consumer import Detector, run_detector

__all__ = ["Detector", "run_detector"]
