"""Prometheus metrics of one server (a registry of its own, so several apps in one process, as
in the tests, do not share counters): queue depth, batch sizes, request latency, images served,
errors by HTTP status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self._queue = Gauge("fastflow_queue_depth", "requests waiting for the worker", registry=r)
        self._batch = Histogram("fastflow_batch_size", "images per pipeline call", buckets=BATCH_BUCKETS, registry=r)
        self._latency = Histogram("fastflow_request_latency_seconds", "arrival to images ready, per request",
                                  buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self._images = Counter("fastflow_images", "images served", registry=r)
        self._requests = Counter("fastflow_requests", "generation requests answered with images", registry=r)
        self._errors = Counter("fastflow_errors", "requests answered with an error, by HTTP status", ["code"],
                               registry=r)  # fmt: skip

    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def batch(self, images: int) -> None:
        self._batch.observe(images)

    def served(self, images: int, seconds: float) -> None:
        self._images.inc(images)
        self._requests.inc()
        self._latency.observe(seconds)

    def error(self, status: int) -> None:
        self._errors.labels(code=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
