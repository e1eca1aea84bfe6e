"""Domain errors: raised where a problem is found; `service.api.problems` maps them to HTTP."""

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
