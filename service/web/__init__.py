"""The browser app at `/`: static files (one ES module per view, one stylesheet) that talk to /v1
like any other client (`GET /v1/auth` tells it what its key may do).

The app's pages carry a strict Content-Security-Policy: every script and style is a file served
from here, so nothing inline runs, and the pages may only talk to this origin.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

STATIC = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

blueprint = Blueprint("web", __name__, static_folder=STATIC, static_url_path="/web")


@blueprint.get("/")
def index():
    return send_from_directory(STATIC, "index.html")


@blueprint.after_request
def _secure(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
