"""Prometheus metrics, on a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Requests, latencies, predictions, backbone passes and training jobs."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("headstart_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("headstart_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.predicted_images = Counter("headstart_predicted_images", "Images classified",
                                        registry=self.registry)
        self.job_transitions = Counter("headstart_training_job_transitions",
                                       "Training jobs entering a state", ["state"],
                                       registry=self.registry)
        self.job_seconds = Histogram("headstart_training_job_seconds",
                                     "Wall time of successful training jobs",
                                     registry=self.registry,
                                     buckets=(10, 30, 60, 120, 300, 600, 1200, 3600, 7200))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def predictions(self, count: int) -> None:
        self.predicted_images.inc(count)

    def job_event(self, state: str, seconds: float | None = None) -> None:
        self.job_transitions.labels(state).inc()
        if seconds is not None:
            self.job_seconds.observe(seconds)

    def watch(self, jobs_by_state: Callable[[], dict[str, int]],
              backbone_passes: Callable[[], int]) -> None:
        """Adds gauges read at scrape time from the store (the truth) and the backbone."""
        self.registry.register(_LiveCollector(jobs_by_state, backbone_passes))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, jobs_by_state, backbone_passes):
        self._jobs_by_state = jobs_by_state
        self._backbone_passes = backbone_passes

    def describe(self):
        return []

    def collect(self):
        jobs = GaugeMetricFamily("headstart_classifiers", "Classifiers in the store by status",
                                 labels=["status"])
        counts = Tally(self._jobs_by_state())
        for status in ("queued", "training", "ready", "failed", "cancelled"):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        passes = CounterMetricFamily("headstart_backbone_images",
                                     "Images sent through the backbone by this process")
        passes.add_metric([], self._backbone_passes())
        yield passes
