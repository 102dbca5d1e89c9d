"""Timing helper shared by the micro-benchmarks (guard.py, resources.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def rate(fn: Callable[[], int], windows: int = 3) -> float:
    """Best-of-``windows`` operations per second; ``fn`` returns how many it did."""
    best = 0.0
    for _ in range(windows):
        gc.collect()
        start = time.perf_counter()
        done = fn()
        best = max(best, done / (time.perf_counter() - start))
    return best
