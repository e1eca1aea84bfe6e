"""HTTP routes: parse and validate, call one use case, serialise."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request, url_for
from pydantic import BaseModel, ValidationError

from service import jobs, plots
from service.errors import BadRequest, Unprocessable
from service.openapi import documented
from service.schemas import (Classifier, ClassifierList, PredictionResponse, PredictQuery,
                             PredictRequest, Report, TrainingOptions)

api = Blueprint("v1", __name__, url_prefix="/v1")

_UPLOAD = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["dataset"],
    "properties": {
        "dataset": {"type": "string", "format": "binary",
                    "description": "A .zip whose top-level folders are the labels"},
        "options": {"type": "string", "description": "JSON training options (TrainingOptions)"},
    }}}}
_PREDICT = {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": PredictRequest,
}


def services() -> jobs.Services:
    return current_app.extensions["headstart"]


def json_response(model: BaseModel, status: int = 200, **headers: str) -> Response:
    return Response(model.model_dump_json(), status=status, mimetype="application/json",
                    headers=headers)


def parse(model: type[BaseModel], data, what: str):
    """Validates user input; problems become a 422 listing each field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = [{"field": ".".join(str(part) for part in e["loc"]) or what,
                     "message": e["msg"]} for e in error.errors(include_url=False)]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise Unprocessable(f"invalid {what}: {summary}", errors=problems) from None


def parse_json(raw: str | bytes, what: str):
    """Parses JSON a client sent; anything the parser refuses is a 400."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except ValueError as error:  # bad syntax or encoding, or an integer too long to convert
        raise BadRequest(f"{what} is not valid JSON: {error}") from None


def _options() -> TrainingOptions:
    raw = request.form.get("options")
    if raw is None and "options" in request.files:
        raw = request.files["options"].read().decode("utf-8", "replace")
    if raw is None or not raw.strip():
        return TrainingOptions()
    return parse(TrainingOptions, parse_json(raw, "options"), "options")


@api.post("/classifiers")
@documented(body=_UPLOAD, responses={202: Classifier, 400: None, 413: None, 422: None, 503: None})
def create_classifier():
    """Create a classifier from a zip of labeled images.

    Answers at once with the queued classifier; poll it until `status` is `ready`.
    """
    # NB: the slot is taken before the body is read: receiving it is part of the work bounded.
    with current_app.extensions["headstart.uploads"].slot():
        upload = request.files.get("dataset")
        if upload is None:
            raise BadRequest("send the dataset zip as the multipart part 'dataset'")
        classifier = jobs.create_classifier(services(), upload.stream, _options())
    location = url_for("v1.get_classifier", classifier_id=classifier.id)
    return json_response(classifier, 202, Location=location)


@api.get("/classifiers")
@documented(responses={200: ClassifierList})
def list_classifiers():
    """List classifiers, newest first."""
    return json_response(ClassifierList(classifiers=jobs.list_classifiers(services())))


@api.get("/classifiers/<classifier_id>")
@documented(responses={200: Classifier, 404: None})
def get_classifier(classifier_id: str):
    """Get a classifier: status, progress, labels and metrics."""
    return json_response(jobs.get_classifier(services(), classifier_id))


@api.get("/classifiers/<classifier_id>/report")
@documented(responses={200: Report, 404: None, 409: None})
def get_report(classifier_id: str):
    """Get the training report of a finished classifier."""
    return json_response(jobs.get_report(services(), classifier_id))


@api.post("/classifiers/<classifier_id>/predict")
@documented(body=_PREDICT, query=PredictQuery,
            responses={200: PredictionResponse, 400: None, 404: None, 409: None, 413: None,
                       422: None, 503: None})
def predict(classifier_id: str):
    """Classify one or more images.

    Send multipart `image` parts, or JSON `{"instances": [{"b64": "..."}]}`.
    """
    query = parse(PredictQuery, request.args.to_dict(), "query")
    if request.is_json:
        body = parse(PredictRequest, parse_json(request.get_data(), "the body"), "body")
        images = jobs.decode_base64_images([instance.b64 for instance in body.instances])
    else:
        images = [part.read() for part in request.files.getlist("image")]
    return json_response(jobs.predict(services(), classifier_id, images, query.top_k))


@api.delete("/classifiers/<classifier_id>")
@documented(responses={204: None, 404: None})
def delete_classifier(classifier_id: str):
    """Delete a classifier, cancelling its training if it is running."""
    jobs.delete_classifier(services(), classifier_id)
    return Response(status=204)


def _svg(document: str, filename: str) -> Response:
    # NB: an SVG opened on its own is a document of this origin; it needs nothing, so it may run
    # nothing, whatever a label says.
    return Response(document, mimetype="image/svg+xml", headers={
        "Content-Disposition": f'inline; filename="{filename}"',
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})


@api.get("/classifiers/<classifier_id>/report/curves.svg")
@documented(responses={200: "image/svg+xml", 404: None, 409: None})
def get_report_curves(classifier_id: str):
    """Training and validation loss and accuracy per epoch, as an SVG image."""
    report = jobs.get_report(services(), classifier_id).model_dump(mode="json")
    name = jobs.get_classifier(services(), classifier_id).name
    return _svg(plots.curves_svg(report, name), f"{classifier_id}-curves.svg")


@api.get("/classifiers/<classifier_id>/report/confusion.svg")
@documented(responses={200: "image/svg+xml", 404: None, 409: None})
def get_report_confusion(classifier_id: str):
    """The validation confusion matrix as a heat map, as an SVG image."""
    report = jobs.get_report(services(), classifier_id).model_dump(mode="json")
    name = jobs.get_classifier(services(), classifier_id).name
    return _svg(plots.confusion_svg(report, name), f"{classifier_id}-confusion.svg")
