"""The application factory: the composition root where settings meet concrete parts.

It is the only place that builds concrete things (the store, the runner, the backbone holder).
Importing it imports no TensorFlow: the backbone loads on a thread after gunicorn forks, and the
training code is imported by the training thread when it first runs a job.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, g, request

from service import web
from service.api.auth import load_api_keys, require_api_keys
from service.api.limits import ClientLimits, UploadLimiter
from service.api.openapi import build_document
from service.api.ops import ops
from service.api.problems import register_error_handlers
from service.api.requests import Request
from service.api.routes import api
from service.config import Settings
from service.errors import HeadstartError
from service.jobs import recovery
from service.jobs.events import StreamSlots
from service.jobs.export import export_builder
from service.jobs.services import Services
from service.metrics import Metrics
from service.serving.backbone import BackboneHolder, batching_options, load_configured_backbone
from service.serving.heads import HeadCache, ServedHead, load_served_head
from service.storage.blobs import LocalBlobStore
from service.storage.classifiers import ClassifierStore

log = logging.getLogger(__name__)
VERSION = "0.1.0"


def create_app(settings: Settings | None = None, *,
               on_backbone_error: Callable[[BaseException], None] | None = None) -> Flask:
    """Builds the Flask app and its services. Nothing heavy happens at import.

    Args:
        settings: defaults to reading `HEADSTART_*` from the environment.
        on_backbone_error: called if the backbone cannot be loaded (the gunicorn entry point
            exits the process there, so a server without weights refuses to start).
    """
    settings = settings or Settings()
    api_keys = load_api_keys(settings)  # first: a bad key configuration stops start-up at once
    app = Flask(__name__)
    app.request_class = Request
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    Path(settings.weights_cache).mkdir(parents=True, exist_ok=True)

    store = open_store(settings)
    backbone = BackboneHolder(lambda: load_configured_backbone(settings),
                              on_error=on_backbone_error, batching=batching_options(settings))
    heads = HeadCache(lambda record: _load_head(store, backbone, record),
                      capacity=settings.head_cache_size)
    services = Services(settings=settings, store=store, backbone=backbone, heads=heads,
                        runner=open_runner(settings), metrics=Metrics())
    services.metrics.watch(store, services.runner.depth, lambda: backbone.queued_images,
                           full_scan_s=settings.metrics_store_scan_s)
    services.metrics.watch_backbone(backbone.images_by_purpose)
    app.extensions["headstart"] = services
    app.extensions["headstart.uploads"] = UploadLimiter(settings.max_concurrent_uploads)
    app.extensions["headstart.api_keys"] = api_keys
    app.extensions["headstart.event_streams"] = StreamSlots(settings.max_event_streams)
    app.extensions["headstart.exports"] = export_builder(services)
    # NB: read by the gunicorn worker (service.api.gthread), which guards the sockets.
    app.extensions["headstart.clients"] = ClientLimits(
        header_timeout_s=settings.client_header_timeout_s,
        min_bytes_per_s=settings.client_min_bytes_per_s)

    register_error_handlers(app)
    _instrument(app, services.metrics)
    require_api_keys(app, api_keys)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(web.blueprint)
    app.extensions["headstart.openapi"] = build_document(app, "Headstart", VERSION)

    backbone.start()
    if settings.queue == "local":
        recovery.recover_jobs(services)
        services.runner.start(lambda job, should_stop: _train(services, job, should_stop))
    _start_sweeper(services)
    return app


def open_store(settings: Settings) -> ClassifierStore:
    """The store `HEADSTART_STORE` names: a local directory, or `s3://bucket/prefix` (checked
    once for conditional writes, which the job protocol needs)."""
    if settings.store.startswith("s3://"):
        from service.storage.s3 import open_s3_blob_store  # boto3 only when S3 is used

        blobs = open_s3_blob_store(settings.store, settings)
        if settings.s3_check_conditional_writes:
            blobs.check_conditional_writes()
        return ClassifierStore(blobs)
    return ClassifierStore(LocalBlobStore(settings.store))


def open_runner(settings: Settings):
    """The in-process thread for `HEADSTART_QUEUE=local`, else Celery over the broker."""
    if settings.queue == "local":
        from service.workers.thread import ThreadRunner

        return ThreadRunner()
    from service.workers.broker import CeleryRunner  # Celery only when a broker is used

    return CeleryRunner(settings)


def _train(services: Services, job: str, should_stop: Callable[[], bool]) -> None:
    # NB: imported on the training thread, after fork: it loads TensorFlow.
    from service.jobs.training import run_training_job

    run_training_job(services, job, should_stop)


def _start_sweeper(services: Services) -> None:
    """Every few seconds, re-queue the jobs of workers that died and re-publish jobs whose queue
    message was lost. Each API replica sweeps; every change is a compare-and-set, so two
    replicas sweeping at once change a job once."""
    interval = services.settings.lease_seconds / 3
    jitter = random.Random()  # NB: not the global generator, which seeded code may share

    def sweep() -> None:
        while True:
            time.sleep(interval * jitter.uniform(0.8, 1.2))
            try:
                recovery.sweep(services)
            except HeadstartError as error:
                log.warning("lost-job sweep skipped: %s", error.detail)
            except Exception:  # the sweeper must outlive any one failure
                log.exception("lost-job sweep failed")

    threading.Thread(target=sweep, name="lost-job-sweeper", daemon=True).start()


def _load_head(store: ClassifierStore, backbone: BackboneHolder, record) -> ServedHead:
    return load_served_head(record, store.load_head(record), backbone.get().feature_dim)


def _instrument(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def observe(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.observe_request(request.method, route, response.status_code,
                                time.perf_counter() - g.get("started", time.perf_counter()))
        return response
