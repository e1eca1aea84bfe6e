"""The web app's server side, without a browser: its files and their Content-Security-Policy,
GET /v1/auth, and the docs' Swagger UI 5 assets. (tests/test_web.py drives it in chromium.)"""

import re

import pytest

from service.app import create_app
from service.config import Settings

ADMIN_KEY, PREDICT_KEY = "app-admin-key-0123456789", "app-predict-key-0123456789"


def make_client(tmp_path, **settings):
    return create_app(Settings(store=str(tmp_path / "store"), backbone_weights="random",
                               image_size=32, weights_cache=tmp_path / "cache",
                               **settings)).test_client()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return make_client(tmp_path_factory.mktemp("web-open"))


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    return make_client(tmp_path_factory.mktemp("web-keys"),
                       api_keys=f"{ADMIN_KEY}:admin,{PREDICT_KEY}:predict")


def test_the_app_is_served_at_the_root_with_a_strict_policy(client):
    page = client.get("/", buffered=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    html = page.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert "style=" not in html and "<style" not in html
    for src in re.findall(r'(?:src|href)="(web/[^"]+)"', html):
        assert client.get("/" + src, buffered=True).status_code == 200, src


def test_every_module_is_served_as_javascript(client):
    main = client.get("/web/js/main.js", buffered=True)
    assert main.status_code == 200
    assert main.mimetype in ("text/javascript", "application/javascript")
    assert main.headers["X-Content-Type-Options"] == "nosniff"
    for module in re.findall(r'from "\./([a-z]+\.js)"', main.get_data(as_text=True)):
        assert client.get(f"/web/js/{module}", buffered=True).status_code == 200, module


def test_auth_without_keys_says_everything_is_allowed(client):
    answer = client.get("/v1/auth")
    assert answer.status_code == 200
    assert answer.json == {"scope": "admin", "keys_required": False}


def test_auth_with_keys_names_the_scope_of_the_key(keyed):
    refused = keyed.get("/v1/auth")
    assert refused.status_code == 401 and refused.mimetype == "application/problem+json"
    assert keyed.get("/v1/auth", headers={"Authorization": "Bearer wrong-key-0123456789"}
                     ).status_code == 401
    for key, scope in ((ADMIN_KEY, "admin"), (PREDICT_KEY, "predict")):
        answer = keyed.get("/v1/auth", headers={"Authorization": f"Bearer {key}"})
        assert answer.json == {"scope": scope, "keys_required": True}
    assert keyed.get("/", buffered=True).status_code == 200  # the app itself loads without a key


def test_the_openapi_document_describes_the_new_routes(client):
    paths = client.get("/openapi.json").json["paths"]
    assert paths["/v1/auth"]["get"]["summary"].startswith("What the caller's API key may do")
    assert paths["/v1/auth"]["get"]["security"] == [{"bearer": []}]
    for name in ("curves", "confusion"):
        operation = paths[f"/v1/classifiers/{{classifier_id}}/report/{name}.svg"]["get"]
        assert "image/svg+xml" in operation["responses"]["200"]["content"]
        assert {"404", "409"} <= set(operation["responses"])


def test_the_docs_serve_swagger_ui_5_which_renders_openapi_3_1(client):
    assert client.get("/openapi.json").json["openapi"].startswith("3.1")
    page = client.get("/docs").get_data(as_text=True)
    for asset in re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', page):
        assert client.get(asset, buffered=True).status_code == 200, asset
    assert client.get("/docs/static/swagger-ui-bundle.js", buffered=True).status_code == 200
    # the Swagger UI release the package ships: 5 is the first that reads OpenAPI 3.1
    version = client.get("/docs/static/VERSION", buffered=True).get_data(as_text=True)
    assert version.strip().startswith("v5.")
