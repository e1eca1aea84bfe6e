"""The browser app at `/`: static files (one ES module per view, one stylesheet) that talk to /v1
like any other client; and `GET /v1/auth`, which tells a client what its key may do.

The app's pages carry a strict Content-Security-Policy: every script and style is a file served
from here, so nothing inline runs, and the pages may only talk to this origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from flask import Blueprint, current_app, request, send_from_directory
from pydantic import BaseModel, Field

from service.auth import ADMIN, PREDICT, ApiKey, authorize
from service.errors import Forbidden
from service.openapi import documented
from service.routes import json_response

STATIC = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

blueprint = Blueprint("web", __name__, static_folder=STATIC, static_url_path="/web")


class AuthOut(BaseModel):
    """What the caller may do. Without keys configured everyone may do everything (admin)."""

    scope: Literal["admin", "predict"] = Field(
        description="admin: everything; predict: list, get, read reports and predict")
    keys_required: bool = Field(description="Whether this server asks for an API key")


@blueprint.record_once
def _keep_api_keys(state) -> None:
    # NB: create_app hands the keys over as a register option, so they are parsed only once.
    state.app.extensions["headstart.web.api_keys"] = state.options["api_keys"]


@blueprint.get("/")
def index():
    return send_from_directory(STATIC, "index.html")


@blueprint.get("/v1/auth")
@documented(responses={200: AuthOut})
def auth():
    """What the caller's API key may do, and whether keys are required at all."""
    keys: list[ApiKey] = current_app.extensions["headstart.web.api_keys"]
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


@blueprint.after_request
def _secure(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
