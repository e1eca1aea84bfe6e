"""Domain errors, and the one place that turns any error into an RFC 9457 problem response."""

from __future__ import annotations

from typing import Any


class HeadstartError(Exception):
    """Base of every error a user can cause or see. `status` is its HTTP status."""

    status = 500
    title = "Internal server error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class BadRequest(HeadstartError):
    status = 400
    title = "Bad request"


class Unauthorized(HeadstartError):
    status = 401
    title = "Unauthorized"


class Forbidden(HeadstartError):
    status = 403
    title = "Forbidden"


class NotFound(HeadstartError):
    status = 404
    title = "Not found"


class Conflict(HeadstartError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(HeadstartError):
    status = 413
    title = "Payload too large"


class Unprocessable(HeadstartError):
    status = 422
    title = "Unprocessable content"


class TooManyRequests(HeadstartError):
    status = 429
    title = "Too many requests"


class ServiceUnavailable(HeadstartError):
    status = 503
    title = "Service unavailable"


def problem_body(status: int, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if errors:
        body["errors"] = errors
    return body


def register_error_handlers(app) -> None:
    """Maps every error — ours, Werkzeug's (404, 405, 413 …) and bugs — to problem+json."""
    import logging

    from flask import Response, json
    from werkzeug.exceptions import HTTPException

    log = logging.getLogger("service.errors")

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

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        status = error.code or 500
        detail = error.description or error.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"the request body is larger than the limit of {limit} bytes"
        headers = {name: value for name, value in error.get_headers()
                   if name.lower() in ("allow", "retry-after")}
        return respond(status, problem_body(status, error.name, detail), headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("unhandled error")
        return respond(500, problem_body(500, "Internal server error",
                                         "an unexpected error occurred; it has been logged"))
