"""The application factory: the composition root where settings meet concrete parts."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, g, json, request, send_from_directory

from service import jobs, web
from service.auth import load_api_keys, require_api_keys
from service.errors import HeadstartError, register_error_handlers
from service.limits import UploadLimiter
from service.metrics import CONTENT_TYPE, Metrics
from service.openapi import DOCS_HTML, build_document, documented
from service.routes import api, json_response, services
from service.runner import ThreadRunner
from service.schemas import BackboneOut, Health, Readiness, Startup
from service.serving import (BackboneHolder, HeadCache, batching_options,
                             load_configured_backbone)
from service.settings import Settings
from service.store import open_store

log = logging.getLogger(__name__)
VERSION = "0.1.0"

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
@documented(responses={200: Health})
def healthz():
    """Liveness: the process answers."""
    return json_response(Health(status="ok"))


@ops.get("/startupz")
@documented(responses={200: Startup, 503: Startup})
def startupz():
    """Startup: the backbone is loaded and warmed up (Kubernetes' startupProbe). Unlike
    /readyz it ignores the store and the broker, so an outage elsewhere never restarts pods."""
    s = services()
    if s.backbone.ready:
        return json_response(Startup(status="ok"))
    return json_response(Startup(status=f"failed: {s.backbone.error}" if s.backbone.error
                                 else "loading"), 503)


@ops.get("/readyz")
@documented(responses={200: Readiness, 503: Readiness})
def readyz():
    """Readiness: backbone loaded and warmed up, store and queue reachable."""
    s = services()
    checks = {}
    checks["backbone"] = "ok" if s.backbone.ready else (
        f"failed: {s.backbone.error}" if s.backbone.error else "loading")
    for name, probe in (("store", s.store.ping), ("queue", s.runner.ping)):
        try:
            probe()
            checks[name] = "ok"
        except HeadstartError as error:
            checks[name] = error.detail
    ready = all(value == "ok" for value in checks.values())
    identity = BackboneOut(**s.backbone.identity().as_dict()) if s.backbone.ready else None
    body = Readiness(ready=ready, checks=checks, backbone=identity)
    return json_response(body, 200 if ready else 503)


@ops.get("/metrics")
@documented(responses={200: CONTENT_TYPE})
def metrics():
    """Prometheus metrics."""
    return Response(services().metrics.render(), mimetype=CONTENT_TYPE.split(";")[0])


@ops.get("/openapi.json")
@documented(responses={200: "application/json"})
def openapi_document():
    """This document: OpenAPI 3 generated from the pydantic models."""
    document = current_app.extensions["headstart.openapi"]
    return Response(json.dumps(document), mimetype="application/json")


@ops.get("/docs")
def docs():
    """Interactive API documentation."""
    return Response(DOCS_HTML.format(static="/docs/static", spec="/openapi.json"),
                    mimetype="text/html")


@ops.get("/docs/static/<path:filename>")
def docs_static(filename: str):
    from importlib.resources import files

    return send_from_directory(files("flask_swagger_ui") / "dist", filename)


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
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    Path(settings.weights_cache).mkdir(parents=True, exist_ok=True)

    store = open_store(settings)
    metrics_ = Metrics()
    backbone = BackboneHolder(lambda: load_configured_backbone(settings),
                              on_error=on_backbone_error, batching=batching_options(settings))
    services_ = jobs.Services(settings=settings, store=store, backbone=backbone,
                              heads=None, runner=None, metrics=metrics_)
    services_.heads = HeadCache(lambda record: _load_head(services_, record),
                                capacity=settings.head_cache_size)
    services_.runner = _runner(services_)
    metrics_.watch(store.list_records, services_.runner.depth, lambda: backbone.passes,
                   lambda: backbone.queued_images)
    app.extensions["headstart"] = services_
    app.extensions["headstart.uploads"] = UploadLimiter(settings.max_concurrent_uploads)

    register_error_handlers(app)
    _instrument(app, metrics_)
    require_api_keys(app, api_keys)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(web.blueprint, api_keys=api_keys)
    app.extensions["headstart.openapi"] = build_document(app, "Headstart", VERSION)

    backbone.start()
    if settings.queue == "local":
        jobs.recover_jobs(services_)
    else:
        _sweep_lost_jobs(services_)
    return app


def _runner(services_: jobs.Services):
    if services_.settings.queue == "local":
        return ThreadRunner(lambda classifier_id, should_stop: jobs.run_training_job(
            services_, classifier_id, should_stop))
    from service.broker import CeleryRunner  # Celery is imported only when a broker is used

    return CeleryRunner(services_.settings)


def _sweep_lost_jobs(services_: jobs.Services) -> None:
    """Every few seconds, re-queue the jobs of workers that died. Each API replica sweeps; a
    job re-queued twice is delivered twice, and the second delivery finds it taken."""
    interval = services_.settings.lease_seconds / 3
    jitter = random.Random()  # NB: not the global generator, which seeded code may share

    def sweep() -> None:
        while True:
            time.sleep(interval * jitter.uniform(0.8, 1.2))
            try:
                jobs.requeue_lost_jobs(services_)
            except HeadstartError as error:
                log.warning("lost-job sweep skipped: %s", error.detail)
            except Exception:  # the sweeper must outlive any one failure
                log.exception("lost-job sweep failed")

    threading.Thread(target=sweep, name="lost-job-sweeper", daemon=True).start()


def _load_head(services_: jobs.Services, record):
    from models.heads import HeadSpec, load_head

    backbone = services_.backbone.get()
    spec = HeadSpec(**record.head.model_dump())
    return load_head(spec, backbone.feature_dim, len(record.labels),
                     services_.store.load_head(record))


def _instrument(app: Flask, metrics_: Metrics) -> None:
    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def observe(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics_.observe_request(request.method, route, response.status_code,
                                 time.perf_counter() - g.get("started", time.perf_counter()))
        return response
