"""Prometheus metrics: the fixed names dashboards rely on (``app.access`` counts the requests).

Each app has its own registry (with the client library's process, platform and GC
collectors), so several apps in one process, as in the tests, never clash.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

STAGES = ("decode", "queue", "inference", "postprocess")
REJECTION_REASONS = (
    "invalid_image",
    "too_large",
    "unsupported_type",
    "bad_request",
    "overloaded",
    "timeout",
    "slow_upload",
    "disconnected",
)


def batch_size_buckets(max_batch_size: int) -> list[float]:
    """1, 2, 4, ... up to ``max_batch_size`` (included even when not a power of two)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    return [*buckets, float(max_batch_size)]


class Metrics:
    """The service's collectors, registered on their own registry. Units are base units."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.request_duration = Histogram(
            "ssd_request_duration_seconds", "HTTP request duration", ["route"], registry=r
        )
        self.stage_duration = Histogram(
            "ssd_stage_duration_seconds",
            "Time per image in each stage: decode (bytes to network input), queue (waiting "
            "for a batch), inference (forward pass of its batch), postprocess (box decoding "
            "and NMS of its batch)",
            ["stage"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ssd_batch_size",
            "Images per forward pass",
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.queue_depth = Gauge("ssd_queue_depth", "Images waiting for a batch", registry=r)
        self.queue_capacity = Gauge(
            "ssd_queue_capacity",
            "Most images that may wait or be reserved for a batch (SSD_MAX_QUEUE); more get 503",
            registry=r,
        )
        self.images = Counter("ssd_images", "Images run through the model", registry=r)
        self.detections = Counter("ssd_detections", "Detections returned", ["label"], registry=r)
        self.requests = Counter(
            "ssd_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.rejected = Counter("ssd_rejected", "Requests refused", ["reason"], registry=r)
        self.model_info = Gauge(
            "ssd_model_info",
            "The model being served (value 1)",
            ["name", "version", "device", "precision"],
            registry=r,
        )
        for stage in STAGES:  # pre-create, so every series exists from the first scrape
            self.stage_duration.labels(stage=stage)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
