"""The one place that turns any error into an RFC 9457 problem response."""

from __future__ import annotations

import errno
import logging
from typing import Any

from flask import Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from service.api.limits import RETRY_AFTER_S, ClientTooSlow
from service.errors import HeadstartError

log = logging.getLogger(__name__)

#: A problem document lists this many field errors; `errors_total` counts them all.
MAX_LISTED_ERRORS = 20
#: What a full disk (or a quota) raises while a request spools its body or a dataset.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def problem_body(status: int, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if errors:
        body["errors"] = errors[:MAX_LISTED_ERRORS]
        if len(errors) > MAX_LISTED_ERRORS:
            body["errors_total"] = len(errors)
    return body


def register_error_handlers(app) -> None:
    """Maps every error — ours, Werkzeug's (404, 405, 413 …) and bugs — to problem+json."""
    def respond(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
        response = Response(json.dumps(body), status=status,
                            mimetype="application/problem+json")
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    @app.errorhandler(HeadstartError)
    def headstart_error(error: HeadstartError):
        return respond(error.status, problem_body(error.status, error.title, error.detail,
                                                  error.errors), error.headers)

    @app.errorhandler(ClientTooSlow)
    def too_slow(error: ClientTooSlow):
        log.info("request from %s cut off: %s", request.remote_addr, error)
        return respond(408, problem_body(408, "Request Timeout", str(error)))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if isinstance(error.__context__, ClientTooSlow):  # Werkzeug's body stream says
            return too_slow(error.__context__)            # "disconnected" for any OSError
        status = error.code or 500
        detail = _too_large(error) if status == 413 else error.description or error.name
        headers = {name: value for name, value in error.get_headers()
                   if name.lower() in ("allow", "retry-after")}
        return respond(status, problem_body(status, error.name, detail), headers)

    @app.errorhandler(OSError)
    def os_error(error: OSError):
        if error.errno not in _NO_SPACE:
            return unexpected_error(error)
        log.error("no space left for a request: %s", error)
        return respond(503, problem_body(
            503, "Service unavailable", "the server has no disk space left for this request "
            f"(its temporary files); try again in {RETRY_AFTER_S} s or send less"),
            {"Retry-After": str(RETRY_AFTER_S)})

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("unhandled error")
        return respond(500, problem_body(500, "Internal server error",
                                         "an unexpected error occurred; it has been logged"))


def _too_large(error: HTTPException) -> str:
    """Names the limit a 413 from Werkzeug hit: the body, the number of multipart parts, or the
    size of one form field. Werkzeug raises the same exception for each, so the frame that
    raised it tells them apart."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    code = frame.tb_frame.f_code if frame is not None else None
    module = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
    if module in ("werkzeug.sansio.multipart", "werkzeug.formparser"):
        if code is not None and code.co_name == "next_event":
            return (f"the multipart body has more than {request.max_form_parts} parts, "
                    "the limit")
        return (f"a multipart form field is larger than the limit of "
                f"{request.max_form_memory_size} bytes")
    # NB: predict sets its own, smaller limit on the request (`routes.predict`)
    setting = ("HEADSTART_MAX_UPLOAD_BYTES"
               if request.max_content_length == current_app.config.get("MAX_CONTENT_LENGTH")
               else "HEADSTART_MAX_PREDICT_BYTES")
    return (f"the request body is larger than the limit of {request.max_content_length} bytes "
            f"({setting})")
