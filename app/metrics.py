"""Prometheus metrics: the fixed names dashboards rely on (``app.access`` counts the requests).

The series about models carry a ``model`` label, the name a request picks the model by
(``?model=NAME``); ``ModelMetrics`` is one model's view, with that label bound.

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
RELOAD_RESULTS = ("ok", "failed")
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
            ["model", "stage"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ssd_batch_size",
            "Images per forward pass",
            ["model"],
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.queue_depth = Gauge(
            "ssd_queue_depth", "Images waiting for a batch", ["model"], registry=r
        )
        self.queue_capacity = Gauge(
            "ssd_queue_capacity",
            "Most images that may wait or be reserved for a batch (SSD_MAX_QUEUE); more get 503",
            ["model"],
            registry=r,
        )
        self.images = Counter("ssd_images", "Images run through the model", ["model"], registry=r)
        self.detections = Counter(
            "ssd_detections", "Detections returned", ["model", "label"], registry=r
        )
        self.requests = Counter(
            "ssd_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.rejected = Counter("ssd_rejected", "Requests refused", ["reason"], registry=r)
        self.model_info = Gauge(
            "ssd_model_info",
            "The copy of each model being served (value 1)",
            ["model", "version", "device", "precision"],
            registry=r,
        )
        self.copies = Gauge(
            "ssd_model_copies",
            "Copies of each model in memory: 1, and 2 while a reload loads beside the one serving "
            "or the old one finishes its requests; more means copies are not being freed",
            ["model"],
            registry=r,
        )
        self.reloads = Counter(
            "ssd_model_reloads",
            "Reloads of a model's weights, by result (ok, failed)",
            ["model", "result"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # pre-create, so every series exists from the start
            self.rejected.labels(reason=reason)

    def for_model(self, name: str) -> ModelMetrics:
        """The series of the model named ``name``, created now (so they exist from the first
        scrape)."""
        return ModelMetrics(self, name)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelMetrics:
    """One model's series: ``Metrics`` with the ``model`` label bound to ``name``."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        self._stages = {
            stage: metrics.stage_duration.labels(model=name, stage=stage) for stage in STAGES
        }
        self._batch_size = metrics.batch_size.labels(model=name)
        self._images = metrics.images.labels(model=name)
        self.queue_depth = metrics.queue_depth.labels(model=name)
        self.queue_capacity = metrics.queue_capacity.labels(model=name)
        self.copies = metrics.copies.labels(model=name)
        for result in RELOAD_RESULTS:
            metrics.reloads.labels(model=name, result=result)
        self._info: tuple[str, ...] | None = None

    def stage(self, stage: str, seconds: float, count: int = 1) -> None:
        """``count`` images spent ``seconds`` each in ``stage`` (one of ``STAGES``)."""
        for _ in range(count):
            self._stages[stage].observe(seconds)

    def batch(self, labels: list[list[str]], forward_s: float, postprocess_s: float) -> None:
        """A batch ran: one list of detected labels per image, and its forward pass and
        post-processing seconds (each image waited for the whole batch's)."""
        count = len(labels)
        self._batch_size.observe(count)
        self._images.inc(count)
        self.stage("inference", forward_s, count)
        self.stage("postprocess", postprocess_s, count)
        for image in labels:
            for label in image:
                self._metrics.detections.labels(model=self.name, label=label).inc()

    def serving(self, version: str, device: str, precision: str) -> None:
        """The copy now answering is ``version`` on ``device`` in ``precision``: its
        ``ssd_model_info`` series is 1, and the previous copy's is gone."""
        if self._info is not None:
            self._metrics.model_info.remove(*self._info)
        self._info = (self.name, version, device, precision)
        self._metrics.model_info.labels(*self._info).set(1)

    def reloaded(self, ok: bool) -> None:
        """Count a reload and its result."""
        self._metrics.reloads.labels(model=self.name, result="ok" if ok else "failed").inc()
