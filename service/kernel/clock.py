"""Time, as a port: every component asks an injected clock, never ``time.time()`` directly.

Production uses :class:`SystemClock`; tests that need to step over an expiry use
:class:`ManualClock`, a real clock implementation whose hands move only when told.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (float, UTC)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
