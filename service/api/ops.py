"""Operations endpoints: probes, metrics, the OpenAPI document and its interactive docs."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, json, send_from_directory

from service.api.openapi import DOCS_HTML, documented
from service.api.routes import json_response, services
from service.api.schemas import BackboneOut, Health, Readiness, Startup
from service.errors import HeadstartError
from service.metrics import CONTENT_TYPE

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
    """Readiness: backbone loaded and batching, store and queue reachable."""
    s = services()
    checks = {}
    checks["backbone"] = "ok" if s.backbone.ready else (
        f"failed: {s.backbone.error}" if s.backbone.error else "loading")
    if s.backbone.ready:  # a stopped batching thread would time out every prediction
        checks["batcher"] = s.backbone.check_batcher()
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
