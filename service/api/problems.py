"""The one place that turns any error into an RFC 9457 problem response."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, json, request
from werkzeug.exceptions import HTTPException

from service.errors import HeadstartError

log = logging.getLogger(__name__)


def problem_body(status: int, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if errors:
        body["errors"] = errors
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

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        status = error.code or 500
        detail = error.description or error.name
        if status == 413:
            limit = request.max_content_length
            detail = f"the request body is larger than the limit of {limit} bytes"
        headers = {name: value for name, value in error.get_headers()
                   if name.lower() in ("allow", "retry-after")}
        return respond(status, problem_body(status, error.name, detail), headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("unhandled error")
        return respond(500, problem_body(500, "Internal server error",
                                         "an unexpected error occurred; it has been logged"))
