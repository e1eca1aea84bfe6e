"""HTTP routes: parse and validate, call one use case, serialise."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request, send_file, url_for
from pydantic import BaseModel, ValidationError

from service.api import plots
from service.api.openapi import documented
from service.api.auth import ADMIN, PREDICT, ApiKey, authorize
from service.api.schemas import (AliasIn, Aliases, AuthOut, Classifier, ClassifierList,
                                 EventsQuery, LabelScore, ListQuery, Prediction,
                                 PredictionResponse, PredictQuery, PredictRequest, Report,
                                 SkippedFileOut, Suggestion, SuggestQuery, SuggestResponse,
                                 TrainingOptions, Version, VersionList, VersionOptions)
from service.errors import BadRequest, Forbidden, PayloadTooLarge, Unprocessable
from service.api.schemas import ExportJob, ExportQuery
from service.jobs import classifiers, events, export, prediction, versions
from service.jobs.services import Services

api = Blueprint("v1", __name__, url_prefix="/v1")

#: The options of a new classifier are a small JSON document: a form field or file part larger
#: than this, or with more values than this, is refused before it is parsed.
# NB: Werkzeug applies the form-field limit to its parser's buffer too, which takes the body
# 64 KiB at a time whatever the part: a limit near that would refuse file parts.
MAX_OPTIONS_BYTES = 256 * 1024
MAX_OPTIONS_VALUES = 1_000
#: A JSON predict body holds one object per image: a few JSON values each.
_VALUES_PER_INSTANCE = 4
#: The summary in a 422's detail names this many fields; `errors` lists more.
_SUMMARISED_ERRORS = 3

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


def services() -> Services:
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
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:_SUMMARISED_ERRORS])
        if len(problems) > _SUMMARISED_ERRORS:
            summary += f" (and {len(problems) - _SUMMARISED_ERRORS} more)"
        raise Unprocessable(f"invalid {what}: {summary}", errors=problems) from None


def parse_json(raw: str | bytes, what: str, max_values: int):
    """Parses JSON a client sent; anything the parser refuses is a 400, and so is a document
    of more than about `max_values` values, refused before it is parsed."""
    if _most_values(raw) > max_values:
        raise BadRequest(f"{what} holds more JSON values than the limit of {max_values}")
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except ValueError as error:  # bad syntax or encoding, or an integer too long to convert
        raise BadRequest(f"{what} is not valid JSON: {error}") from None


def _most_values(raw: str | bytes) -> int:
    """An upper bound on the values in a JSON document, counted without parsing it: every value
    but the first follows a comma or opens a container. Text inside strings counts too, which
    only makes the bound looser."""
    if isinstance(raw, str):
        return raw.count(",") + raw.count("[") + raw.count("{") + 1
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1


def _options(model: type[TrainingOptions] = TrainingOptions) -> TrainingOptions:
    raw = request.form.get("options")  # a form field: MAX_FORM_MEMORY_SIZE bounds it (413)
    if raw is None and "options" in request.files:
        raw = request.files["options"].read(MAX_OPTIONS_BYTES + 1)
        if len(raw) > MAX_OPTIONS_BYTES:
            raise PayloadTooLarge(f"the options part is larger than the limit of "
                                  f"{MAX_OPTIONS_BYTES} bytes")
        raw = raw.decode("utf-8", "replace")
    if raw is None or not raw.strip():
        return model()
    return parse(model, parse_json(raw, "options", MAX_OPTIONS_VALUES), "options")


@api.get("/auth")
@documented(responses={200: AuthOut})
def auth():
    """What the caller's API key may do, and whether keys are required at all."""
    keys: list[ApiKey] = current_app.extensions["headstart.api_keys"]
    if not keys:
        return json_response(AuthOut(scope=ADMIN, keys_required=False))
    # NB: the key was checked before this view ran (any valid key may GET under /v1), so the
    # only question left is whether it may do more.
    try:
        authorize(keys, request.headers.get("Authorization"), ADMIN)
        scope = ADMIN
    except Forbidden:
        scope = PREDICT
    return json_response(AuthOut(scope=scope, keys_required=True))


@api.post("/classifiers")
@documented(body=_UPLOAD, responses={202: Classifier, 400: None, 413: None, 422: None, 503: None})
def create_classifier():
    """Create a classifier from a zip of labeled images.

    Answers at once with the queued classifier; poll it until `status` is `ready`.
    """
    request.max_form_memory_size = MAX_OPTIONS_BYTES
    upload = request.files.get("dataset")  # NB: receives the whole body (spooled to a file)
    if upload is None:
        raise BadRequest("send the dataset zip as the multipart part 'dataset'")
    options = _options()
    # NB: the slot is taken once the body is in: a slow client holds its own thread, never one
    # of the few slots for the work that follows (checking and decoding every image).
    with current_app.extensions["headstart.uploads"].slot():
        record = classifiers.create_classifier(services(), upload.stream, options)
    location = url_for("v1.get_classifier", classifier_id=record.id)
    return json_response(Classifier.from_record(record), 202, Location=location)


@api.get("/classifiers")
@documented(query=ListQuery, responses={200: ClassifierList, 422: None})
def list_classifiers():
    """List classifiers, newest first, a page at a time."""
    query = parse(ListQuery, request.args.to_dict(), "query")
    views, cursor = classifiers.list_classifiers(services(), query.limit, query.cursor)
    return json_response(ClassifierList(
        classifiers=[Classifier.from_record(*view) for view in views], next_cursor=cursor))


@api.get("/classifiers/<classifier_id>")
@documented(responses={200: Classifier, 404: None})
def get_classifier(classifier_id: str):
    """Get a classifier: status, progress, labels and metrics (of its production version)."""
    return json_response(Classifier.from_record(*classifiers.get_view(services(), classifier_id)))


@api.get("/classifiers/<classifier_id>/report")
@documented(responses={200: Report, 404: None, 409: None})
def get_report(classifier_id: str):
    """Get the training report of the served head (`final` false while a later stage may still
    replace it)."""
    return json_response(Report.model_validate(classifiers.get_report(services(), classifier_id)))


@api.get("/classifiers/<classifier_id>/events")
@documented(query=EventsQuery, responses={200: "text/event-stream", 204: None, 400: None,
                                          404: None, 422: None, 503: None})
def classifier_events(classifier_id: str):
    """Follow a classifier as server-sent events: status, progress, epoch, version, done.

    Resume with the `Last-Event-ID` header (or `?last_event_id=`); 204 when a resumed stream
    has nothing left to send. The stream ends after `done`, or after the server's time limit.
    """
    query = parse(EventsQuery, request.args.to_dict(), "query")
    wiring = services()  # NB: the stream is read after the request context has gone

    def resource() -> dict:
        return Classifier.from_record(*classifiers.get_view(wiring, classifier_id)).model_dump(
            mode="json")

    stream = events.follow(resource, wiring.settings,
                           current_app.extensions["headstart.event_streams"], classifier_id,
                           request.headers.get("Last-Event-ID") or query.last_event_id)
    if stream is None:
        return Response(status=204)
    return Response(stream, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.post("/classifiers/<classifier_id>/predict")
@documented(body=_PREDICT, query=PredictQuery,
            responses={200: PredictionResponse, 400: None, 404: None, 409: None, 413: None,
                       422: None, 503: None})
def predict(classifier_id: str):
    """Classify one or more images.

    Send multipart `image` parts, or JSON `{"instances": [{"b64": "..."}]}`. Production's
    version answers unless `version` or `alias` names another. Scores are calibrated; an image
    below the threshold or unlike the training images has `label` null, `rejected` true and a
    `reason`.
    """
    args = request.args.to_dict()
    threshold = prediction.parse_threshold(args.pop("threshold", None))
    query = parse(PredictQuery, args, "query")
    # NB: before the body is read: an unknown or unready classifier costs nothing more.
    record = prediction.servable_record(services(), classifier_id, query.version, query.alias)
    # NB: its own, smaller limit, enforced by Werkzeug while reading (chunked bodies too).
    settings = services().settings
    request.max_content_length = settings.max_predict_bytes
    if request.is_json:
        most = settings.max_predict_images * _VALUES_PER_INSTANCE + _VALUES_PER_INSTANCE
        body = parse(PredictRequest, parse_json(request.get_data(), "the body", most), "body")
        prediction.check_image_count(services(), len(body.instances))
        images = prediction.decode_base64_images([instance.b64 for instance in body.instances])
    else:
        parts = request.files.getlist("image")
        prediction.check_image_count(services(), len(parts))
        images = [part.read() for part in parts]
    answers = prediction.predict(services(), record, images, query.top_k, threshold)
    return json_response(PredictionResponse(classifier_id=classifier_id, version=record.version,
                                            predictions=[
        Prediction(label=answer.label, score=answer.score, rejected=answer.rejected,
                   reason=answer.reason,
                   top_k=[LabelScore(label=label, score=score) for label, score in answer.top_k])
        for answer in answers]))


_SUGGEST = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["dataset"],
    "properties": {"dataset": {"type": "string", "format": "binary",
                               "description": "A .zip of unlabeled images, any folder layout"}}}}}


@api.post("/classifiers/<classifier_id>/suggest")
@documented(body=_SUGGEST, query=SuggestQuery,
            responses={200: SuggestResponse, 400: None, 404: None, 409: None, 413: None,
                       422: None, 503: None})
def suggest(classifier_id: str):
    """Rank unlabeled images by how much labeling each would help.

    Send a zip of images as the multipart part `dataset`; the answer lists the images the
    classifier is least sure about first (out-of-distribution ones last), with its current
    prediction, at most `limit` of them.
    """
    query = parse(SuggestQuery, request.args.to_dict(), "query")
    record = prediction.servable_record(services(), classifier_id)
    upload = request.files.get("dataset")
    if upload is None:
        raise BadRequest("send the images as a zip in the multipart part 'dataset'")
    with current_app.extensions["headstart.uploads"].slot():
        found = prediction.suggest(services(), record, upload.stream, query.limit, query.method)
    return json_response(SuggestResponse(
        classifier_id=classifier_id, method=found.method, images=found.images,
        suggestions=[Suggestion(**entry) for entry in found.suggestions],
        skipped=[SkippedFileOut(path=item.path, reason=item.reason)
                 for item in found.skipped[:100]]))


@api.delete("/classifiers/<classifier_id>")
@documented(responses={204: None, 404: None})
def delete_classifier(classifier_id: str):
    """Delete a classifier, cancelling its training if it is running."""
    classifiers.delete_classifier(services(), classifier_id)
    return Response(status=204)


def _report_and_name(classifier_id: str) -> tuple[dict, str]:
    report = Report.model_validate(classifiers.get_report(services(), classifier_id))
    return report.model_dump(mode="json"), classifiers.get_classifier(services(), classifier_id).name


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
    report, name = _report_and_name(classifier_id)
    return _svg(plots.curves_svg(report, name), f"{classifier_id}-curves.svg")


@api.get("/classifiers/<classifier_id>/report/confusion.svg")
@documented(responses={200: "image/svg+xml", 404: None, 409: None})
def get_report_confusion(classifier_id: str):
    """The validation confusion matrix as a heat map, as an SVG image."""
    report, name = _report_and_name(classifier_id)
    return _svg(plots.confusion_svg(report, name), f"{classifier_id}-confusion.svg")
# ---------------------------------------------------------------- versions and aliases

_ADD = {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "dataset": {"type": "string", "format": "binary",
                "description": "A .zip of images to add; top-level folders are labels (new "
                               "ones allowed)"},
    "options": {"type": "string", "description": "JSON VersionOptions: training options, "
                                                 "base, replace, promote"},
}}}}


@api.post("/classifiers/<classifier_id>/versions")
@documented(body=_ADD, responses={202: Version, 400: None, 404: None, 413: None, 422: None,
                                  503: None})
def add_version(classifier_id: str):
    """Train a new version: the base version's images plus those sent (or only those).

    Answers at once with the queued version; when it is ready it takes `production` as
    `promote` says (default `if_better`).
    """
    request.max_form_memory_size = MAX_OPTIONS_BYTES
    upload = request.files.get("dataset")
    options = _options(VersionOptions)
    with current_app.extensions["headstart.uploads"].slot():
        record = versions.add_version(services(), classifier_id,
                                      upload.stream if upload else None, options)
    location = url_for("v1.get_version", classifier_id=classifier_id, version=record.version)
    return json_response(Version.from_record(record, versions.get_version(
        services(), classifier_id, record.version)[1]), 202, Location=location)


@api.get("/classifiers/<classifier_id>/versions")
@documented(responses={200: VersionList, 404: None})
def list_versions(classifier_id: str):
    """List a classifier's versions, newest first."""
    records, state = versions.list_versions(services(), classifier_id)
    return json_response(VersionList(versions=[Version.from_record(r, state) for r in records]))


@api.get("/classifiers/<classifier_id>/versions/<int:version>")
@documented(responses={200: Version, 404: None})
def get_version(classifier_id: str, version: int):
    """Get one version: status, dataset, metrics, aliases and its promotion."""
    return json_response(Version.from_record(*versions.get_version(services(), classifier_id,
                                                                   version)))


@api.get("/classifiers/<classifier_id>/versions/<int:version>/report")
@documented(responses={200: Report, 404: None, 409: None})
def get_version_report(classifier_id: str, version: int):
    """Get the training report of one version."""
    return json_response(Report.model_validate_json(
        versions.get_version_report(services(), classifier_id, version)))


@api.delete("/classifiers/<classifier_id>/versions/<int:version>")
@documented(responses={204: None, 404: None, 409: None})
def delete_version(classifier_id: str, version: int):
    """Delete a version; 409 while an alias points at it or it is training."""
    versions.delete_version(services(), classifier_id, version)
    return Response(status=204)


@api.put("/classifiers/<classifier_id>/aliases/<name>")
@documented(body={"application/json": AliasIn}, responses={200: Aliases, 404: None, 409: None,
                                                            422: None})
def set_alias(classifier_id: str, name: str):
    """Point an alias at a ready version; `production` is the one predict uses by default.

    Moving `production` back to an earlier version restores its predictions exactly.
    """
    body = parse(AliasIn, parse_json(request.get_data(), "the body", 10), "body")
    state = versions.set_alias(services(), classifier_id, name, body.version)
    return json_response(Aliases(classifier_id=classifier_id, aliases=state.aliases))


# ---------------------------------------------------------------- export


@api.get("/classifiers/<classifier_id>/export")
@documented(query=ExportQuery, responses={200: "application/zip", 202: ExportJob, 404: None,
                                          409: None, 422: None, 503: None})
def export_classifier(classifier_id: str):
    """Export a classifier as a zip: the model, labels.json, model-card.json, README.md.

    `format` is savedmodel, tflite or onnx; the model takes images and returns the service's
    scores (within 1e-4), resizing and preprocessing inside. An export is built once per
    version and format: until it is stored the answer is 202 with `Location` (this URL) and
    `Retry-After`; poll it. Needs an admin key: an export is the whole model.
    """
    query = parse(ExportQuery, request.args.to_dict(), "query")
    result = export.export_classifier(services(), current_app.extensions["headstart.exports"],
                                      classifier_id, query.format, query.version)
    if isinstance(result, export.ExportPending):
        location = url_for("v1.export_classifier", classifier_id=classifier_id,
                           format=query.format, version=query.version)
        return json_response(ExportJob(classifier_id=classifier_id, format=query.format,
                                       version=result.version), 202, Location=location,
                             **{"Retry-After": str(result.retry_after_s)})
    response = send_file(result.archive, mimetype="application/zip", as_attachment=True,
                         download_name=result.filename)
    response.headers["Content-Length"] = str(result.size)
    return response
