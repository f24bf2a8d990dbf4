"""Small timing helpers shared by the benchmarks: median of repeated wall-clock runs, and the
figures of a load run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_figures(requests: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    """Throughput and latency percentiles of ``requests`` answered in ``elapsed`` seconds, each
    after its ``latencies`` (seconds): images/s, p50/p95/p99 in ms, and the request count."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "images_per_s": requests / elapsed,
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
        "requests": requests,
    }
