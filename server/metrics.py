"""Prometheus metrics of one app, in a registry of its own (no process-wide collectors).

No label takes a value from the client beyond a fixed set: methods outside METHODS are counted as "other", routes
are the app's own rules (or "unmatched"), statuses are the server's own.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Stages of a generate request, in order; each has a latency histogram.
STAGES = ("parse", "fetch", "decode", "prepare", "queue", "generate", "encode", "total")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counts by status, per-stage latency, queue depth, batch sizes and readiness."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("klein_requests", "HTTP requests answered, by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.stage_seconds = Histogram("klein_stage_seconds", "Latency of each stage of POST /v1/generate",
                                       ("stage",), buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_depth = Gauge("klein_queue_depth", "Requests waiting for the device worker",
                                 registry=self.registry)
        self.batch_size = Histogram("klein_batch_size", "Requests per batch run on the device",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=self.registry)
        self.images = Counter("klein_images", "Images generated, by model and workflow", ("model", "workflow"),
                              registry=self.registry)
        self.ready = Gauge("klein_ready", "1 once every program is compiled, else 0", registry=self.registry)
        self.compiled_programs = Gauge("klein_compiled_programs", "Programs compiled at start-up",
                                       registry=self.registry)
        self.decoded_pixels = Gauge("klein_decoded_pixels", "Pixels of decoded reference images held by requests "
                                    "(bounded by --max-decoded-pixels)", registry=self.registry)
        self.batch_failures = Counter("klein_batch_failures", "Batches whose run raised, BaseException included "
                                      "(their requests answer 500; the worker goes on)", registry=self.registry)

    def count_request(self, route: str, method: str, status: int) -> None:
        """One answered request (499: the client went away first); unknown methods are counted as 'other'."""
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        """Adds one request's stage timings (milliseconds) to the stage histograms."""
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
