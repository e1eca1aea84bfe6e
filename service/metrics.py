"""Prometheus metrics, on a registry of the app's own (so several apps can live in one process).

Counters of what this process did, plus gauges read from the store (the truth shared by every
replica and worker) and from the broker at scrape time. A scrape reads only the jobs in flight
(the store's `active/` index); the whole store is read at most every `full_scan_s`.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from service.errors import HeadstartError
from service.storage.records import ACTIVE_STATUSES, ClassifierRecord

log = logging.getLogger(__name__)

#: Scrapes within this many seconds share one read of the jobs in flight.
STORE_SNAPSHOT_S = 10.0
JOB_SECONDS_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 3600, 7200, 21600)

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
                                       "Training jobs this process moved into a state",
                                       ["state"], registry=self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def predictions(self, count: int) -> None:
        self.predicted_images.inc(count)

    def job_event(self, state: str) -> None:
        self.job_transitions.labels(state).inc()

    def watch(self, store, queue_depth: Callable[[], int | None],
              predict_queued: Callable[[], int], *, full_scan_s: float = 300.0) -> None:
        """Adds metrics read at scrape time from the store, the queue and the batcher."""
        self.registry.register(_LiveCollector(store, queue_depth, predict_queued, full_scan_s))

    def watch_backbone(self, images: Callable[[], Mapping[str, int]]) -> None:
        """Adds `headstart_backbone_images_total{purpose}`: images this process sent through
        the backbone, by purpose (training, predict), read at scrape time. Every process that
        runs the backbone (API, training worker) counts its own."""
        self.registry.register(_BackboneCollector(images))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(self, store, queue_depth, predict_queued, full_scan_s):
        self._store = store
        self._queue_depth = queue_depth
        self._predict_queued = predict_queued
        self._every = {"active": STORE_SNAPSHOT_S, "all": full_scan_s}
        self._snapshots: dict[str, tuple[float, list[ClassifierRecord]]] = {
            "active": (float("-inf"), []), "all": (float("-inf"), [])}
        self._lock = threading.Lock()

    def describe(self):
        return []

    def _read(self, which: str) -> list[ClassifierRecord]:
        with self._lock:
            taken, records = self._snapshots[which]
            if time.monotonic() - taken > self._every[which]:
                try:
                    records = self._store.list_records() if which == "all" else \
                        [r for r in map(self._load, self._store.active_ids()) if r]
                except HeadstartError as error:  # keep serving metrics; /readyz says why
                    log.warning("metrics: cannot read the store: %s", error.detail)
                    return records
                self._snapshots[which] = (time.monotonic(), records)
            return records

    def _load(self, job: str) -> ClassifierRecord | None:
        try:
            return self._store.load_job(job).record
        except HeadstartError:
            return None

    def _read_store(self) -> list[ClassifierRecord]:
        """Finished classifiers from the last full scan, jobs in flight from the index."""
        active = {(record.id, record.version): record for record in self._read("active")
                  if record.status in ACTIVE_STATUSES}
        finished = [record for record in self._read("all") if record.status not in
                    ACTIVE_STATUSES and (record.id, record.version) not in active]
        return [*active.values(), *finished]

    def collect(self):
        records = self._read_store()
        by_status = GaugeMetricFamily("headstart_classifiers", "Classifiers in the store by status",
                                      labels=["status"])
        counts = Tally(record.status for record in records)
        for status in ("queued", "training", "ready", "failed", "cancelled"):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield _job_seconds(record.training_seconds for record in records
                           if record.training_seconds is not None)
        try:
            depth = self._queue_depth()
        except HeadstartError as error:
            log.warning("metrics: cannot read the queue depth: %s", error.detail)
            depth = None
        if depth is not None:
            queue = GaugeMetricFamily("headstart_queue_depth",
                                      "Training jobs waiting in the queue for a worker")
            queue.add_metric([], depth)
            yield queue
        waiting = GaugeMetricFamily("headstart_predict_queued_images",
                                    "Images waiting for a shared backbone pass in this process")
        waiting.add_metric([], self._predict_queued())
        yield waiting


class _BackboneCollector:
    def __init__(self, images: Callable[[], Mapping[str, int]]):
        self._images = images

    def describe(self):
        return []

    def collect(self):
        passes = CounterMetricFamily("headstart_backbone_images",
                                     "Images sent through the backbone by this process, by "
                                     "purpose (training: features and fine-tuning; predict)",
                                     labels=["purpose"])
        counts = {"training": 0, "predict": 0, **self._images()}
        for purpose, images in sorted(counts.items()):
            passes.add_metric([purpose], images)
        yield passes


def _job_seconds(durations) -> HistogramMetricFamily:
    """Training wall time of the ready classifiers in the store, whichever worker trained them."""
    counts, total = [0] * (len(JOB_SECONDS_BUCKETS) + 1), 0.0
    for seconds in durations:
        counts[bisect.bisect_left(JOB_SECONDS_BUCKETS, seconds)] += 1
        total += seconds
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, JOB_SECONDS_BUCKETS), "+Inf"), counts):
        cumulative += count
        buckets.append((bound, cumulative))
    family = HistogramMetricFamily("headstart_training_job_seconds",
                                   "Training wall time of the ready classifiers in the store")
    family.add_metric([], buckets, sum_value=total)
    return family
