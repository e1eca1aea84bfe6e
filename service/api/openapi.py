"""The OpenAPI 3 document, generated from the routes' `@documented` metadata and the pydantic
models; and the interactive docs page (Swagger UI 5, which reads OpenAPI 3.1, served from the
`flask-swagger-ui` package, so it works without internet)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api import schemas
from service.api.auth import ADMIN, required_scope

REF = "#/components/schemas/{model}"
_PROBLEM = {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}}
_BEARER = {"type": "http", "scheme": "bearer",
           "description": "An API key, when the server has keys configured: "
                          "`Authorization: Bearer <key>`. A predict key may list, get, read "
                          "reports and predict; an admin key may do everything."}
_STATUS_TEXT = {200: "OK", 202: "Accepted", 204: "No content", 400: "Bad request",
                401: "Unauthorized", 403: "Forbidden", 404: "Not found", 409: "Conflict",
                413: "Payload too large", 422: "Unprocessable content", 503: "Unavailable"}


def documented(*, responses: dict[int, type[BaseModel] | str | None],
               body: dict[str, Any] | None = None,
               query: type[BaseModel] | None = None) -> Callable:
    """Attaches OpenAPI metadata to a view. The docstring's first line becomes the summary.

    Args:
        responses: status → pydantic model (JSON body), a media type string, or None (no body).
            Error statuses get the Problem schema automatically.
        body: the requestBody `content` object, for uploads; or {"model": Model} for JSON.
        query: a pydantic model whose fields are the query parameters.
    """
    def decorate(view: Callable) -> Callable:
        view.openapi = {"responses": responses, "body": body, "query": query}
        return view
    return decorate


def build_document(app, title: str, version: str) -> dict[str, Any]:
    """Walks the app's routes and builds the OpenAPI 3.1 document."""
    models = {schemas.Problem}
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        meta = getattr(view, "openapi", None)
        if meta is None:
            continue
        path = _PATH_ARGUMENT.sub(r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            operation = _operation(rule, view, meta, models)
            _secure(operation, required_scope(method, rule.rule, rule.endpoint))
            paths.setdefault(path, {})[method.lower()] = operation
    _, definitions = models_json_schema([(model, "serialization") for model in models],
                                        ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Custom image classifiers on a shared frozen VGG16 backbone. "
                                "Every error is application/problem+json (RFC 9457)."},
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {}),
                       "securitySchemes": {"bearer": _BEARER}},
    }


#: A Flask path argument, with its converter if it names one: `<id>`, `<int:version>`.
_PATH_ARGUMENT = re.compile(r"<(?:\w+:)?(\w+)>")
_INT_ARGUMENT = re.compile(r"<int:(\w+)>")


def _secure(operation: dict[str, Any], scope: str | None) -> None:
    """Marks an operation as needing an API key (when the server has keys configured)."""
    if scope is None:
        return
    operation["security"] = [{"bearer": []}]
    operation["responses"]["401"] = {"description": _STATUS_TEXT[401], "content": _PROBLEM}
    if scope == ADMIN:
        operation["responses"]["403"] = {"description": _STATUS_TEXT[403], "content": _PROBLEM}
        operation["description"] = (operation.get("description", "") +
                                    "\n\nNeeds an admin key.").strip()
    operation["responses"] = dict(sorted(operation["responses"].items()))


def _operation(rule, view, meta: dict, models: set) -> dict[str, Any]:
    doc = (view.__doc__ or "").strip()
    operation: dict[str, Any] = {"operationId": rule.endpoint.replace(".", "_"),
                                 "summary": doc.splitlines()[0] if doc else rule.endpoint,
                                 "responses": {}}
    if len(doc.splitlines()) > 1:
        operation["description"] = "\n".join(line.strip() for line in doc.splitlines()[1:]).strip()
    integers = set(_INT_ARGUMENT.findall(rule.rule))
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "integer" if name in integers else "string"}}
                  for name in sorted(rule.arguments)]
    if meta["query"] is not None:
        query_schema = meta["query"].model_json_schema()
        for name, schema in query_schema.get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "required": False,
                               "schema": schema, "description": schema.get("description", "")})
    if parameters:
        operation["parameters"] = parameters
    if meta["body"] is not None:
        content = {}
        for media_type, spec in meta["body"].items():
            if isinstance(spec, type) and issubclass(spec, BaseModel):
                models.add(spec)
                spec = {"schema": {"$ref": REF.format(model=spec.__name__)}}
            content[media_type] = spec
        operation["requestBody"] = {"required": True, "content": content}
    for status, response in meta["responses"].items():
        entry: dict[str, Any] = {"description": _STATUS_TEXT.get(status, str(status))}
        if isinstance(response, type) and issubclass(response, BaseModel):
            models.add(response)
            entry["content"] = {"application/json": {
                "schema": {"$ref": REF.format(model=response.__name__)}}}
        elif isinstance(response, str):
            entry["content"] = {response: {"schema": {"type": "string"}}}
        elif status >= 400:
            entry["content"] = _PROBLEM
        operation["responses"][str(status)] = entry
    return operation


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Headstart API</title>
<link rel="stylesheet" href="{static}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "{spec}", dom_id: "#swagger-ui"}});</script>
</body></html>"""
