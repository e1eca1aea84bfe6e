"""API keys through Flask's test client: scopes, open endpoints, configuration and logs."""

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.app import create_app
from service.api.auth import ApiKeyConfigError, load_api_keys
from service.config import Settings
from tests.helpers import COLOURS, dataset_zip, image_bytes

ADMIN_KEY = "admin-4f1c2b8e9d7a6c5b"
PREDICT_KEY = "predict-0a9b8c7d6e5f4a3b"
OTHER_ADMIN_KEY = "admin-rotated-1234567890abcdef"
FAST_OPTIONS = '{"max_epochs": 5, "patience": 2, "augmentation": {"views": 0}, ' \
               '"head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings(root, **overrides) -> Settings:
    return Settings(**{"store": str(root / "store"), "backbone_weights": "random",
                       "image_size": 32, "weights_cache": root / "cache", **overrides})


def post_dataset(client, key: str | None):
    form = {"dataset": (io.BytesIO(dataset_zip(4)), "dataset.zip"), "options": FAST_OPTIONS}
    return client.post("/v1/classifiers", data=form, content_type="multipart/form-data",
                       headers=bearer(key) if key else {})


def predict(client, classifier_id: str, key: str):
    form = {"image": (io.BytesIO(image_bytes(COLOURS["red"], seed=3)), "red.png")}
    return client.post(f"/v1/classifiers/{classifier_id}/predict", data=form,
                       content_type="multipart/form-data", headers=bearer(key))


def wait_until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Admin keys from a file (as a mounted secret holds them), the predict key from the
    environment variable's format."""
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "api-keys"
    keys_file.write_text(f"# rotated 2025-01\n{ADMIN_KEY}:admin\n\n{OTHER_ADMIN_KEY}:admin\n")
    app = create_app(settings(root, api_keys=SecretStr(f"{PREDICT_KEY}:predict"),
                              api_keys_file=keys_file))
    client = app.test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200, "backbone not ready")
    return app


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def ready_classifier(client) -> str:
    response = post_dataset(client, ADMIN_KEY)
    assert response.status_code == 202, response.json
    url = f"/v1/classifiers/{response.json['id']}"
    wait_until(lambda: client.get(url, headers=bearer(ADMIN_KEY)).json["status"] == "ready",
               "classifier not ready")
    return response.json["id"]


# ---------------------------------------------------------------- who may do what


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/classifiers"), ("POST", "/v1/classifiers"),
    ("GET", "/v1/classifiers/clf_x"), ("DELETE", "/v1/classifiers/clf_x"),
    ("POST", "/v1/classifiers/clf_x/predict"), ("GET", "/v1/nowhere"),
])
def test_no_key_is_a_401_problem_with_a_bearer_challenge(client, method, path):
    response = client.open(path, method=method)

    assert response.status_code == 401
    assert response.content_type == "application/problem+json"
    assert response.json["status"] == 401 and "Bearer" in response.json["detail"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("authorization", [
    "Bearer not-a-configured-key-000", f"Bearer {ADMIN_KEY}x", f"Bearer {ADMIN_KEY[:-1]}",
    f"Basic {ADMIN_KEY}", "Bearer", "Bearer ", ADMIN_KEY,
])
def test_a_wrong_or_malformed_key_is_a_401(client, authorization):
    response = client.get("/v1/classifiers", headers={"Authorization": authorization})

    assert response.status_code == 401
    assert response.content_type == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_scheme_is_case_insensitive(client):
    response = client.get("/v1/classifiers", headers={"Authorization": f"bearer {PREDICT_KEY}"})
    assert response.status_code == 200


def test_a_predict_key_reads_and_predicts(client, ready_classifier):
    url = f"/v1/classifiers/{ready_classifier}"
    key = bearer(PREDICT_KEY)

    assert ready_classifier in [c["id"] for c in
                                client.get("/v1/classifiers", headers=key).json["classifiers"]]
    assert client.get(url, headers=key).json["status"] == "ready"
    assert client.get(url + "/report", headers=key).status_code == 200
    response = predict(client, ready_classifier, PREDICT_KEY)
    assert response.status_code == 200, response.json
    assert response.json["predictions"][0]["label"] in ("red", "blue")


def test_a_predict_key_cannot_create_or_delete(client, ready_classifier):
    before = client.get("/v1/classifiers", headers=bearer(ADMIN_KEY)).json["classifiers"]

    created = post_dataset(client, PREDICT_KEY)
    deleted = client.delete(f"/v1/classifiers/{ready_classifier}", headers=bearer(PREDICT_KEY))

    for response in (created, deleted):
        assert response.status_code == 403
        assert response.content_type == "application/problem+json"
        assert "admin key" in response.json["detail"]
    after = client.get("/v1/classifiers", headers=bearer(ADMIN_KEY)).json["classifiers"]
    assert after == before


@pytest.mark.parametrize("key", [ADMIN_KEY, OTHER_ADMIN_KEY])
def test_an_admin_key_does_everything(client, key):
    created = post_dataset(client, key)
    assert created.status_code == 202, created.json
    url = f"/v1/classifiers/{created.json['id']}"
    wait_until(lambda: client.get(url, headers=bearer(key)).json["status"] == "ready",
               "classifier not ready")

    assert created.json["id"] in [c["id"] for c in
                                  client.get("/v1/classifiers", headers=bearer(key)).json[
                                      "classifiers"]]
    assert client.get(url + "/report", headers=bearer(key)).status_code == 200
    assert predict(client, created.json["id"], key).status_code == 200
    assert client.delete(url, headers=bearer(key)).status_code == 204
    assert client.get(url, headers=bearer(key)).status_code == 404


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/startupz", "/metrics",
                                  "/openapi.json", "/docs", "/docs/static/swagger-ui.css"])
def test_probes_metrics_and_docs_are_open(client, path):
    with client.get(path) as response:  # closes the static file
        assert response.status_code == 200


def test_the_openapi_document_declares_bearer_keys(client):
    document = client.get("/openapi.json").json

    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = document["paths"]
    for path, operations in paths.items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith("/v1/"), path
    assert "403" in paths["/v1/classifiers"]["post"]["responses"]
    assert "403" in paths["/v1/classifiers/{classifier_id}"]["delete"]["responses"]
    assert "403" not in paths["/v1/classifiers/{classifier_id}/predict"]["post"]["responses"]
    assert "401" in paths["/v1/classifiers"]["get"]["responses"]


# ---------------------------------------------------------------- configuration


def test_keys_from_the_variable_and_the_file_are_combined(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# a comment, with a comma\n  {ADMIN_KEY}:admin , \n\n"
                         f"{OTHER_ADMIN_KEY}:admin\n{PREDICT_KEY}:predict\n")
    monkeypatch.setenv("HEADSTART_API_KEYS", f"{PREDICT_KEY}:predict,,{'p' * 16}:predict")
    monkeypatch.setenv("HEADSTART_API_KEYS_FILE", str(keys_file))

    keys = load_api_keys(Settings())

    assert sorted(key.scope for key in keys) == ["admin", "admin", "predict", "predict"]


def test_unset_keys_leave_the_api_open(monkeypatch):
    monkeypatch.delenv("HEADSTART_API_KEYS", raising=False)
    monkeypatch.setenv("HEADSTART_API_KEYS_FILE", "")
    assert load_api_keys(Settings()) == []


# Each of these once loaded zero keys and left the API open with only a warning.
@pytest.mark.parametrize("value", ["", "  ", ",", " , ,", "\n", f"# {ADMIN_KEY}:admin"])
def test_a_keys_variable_that_holds_no_key_stops_start_up(value, monkeypatch):
    monkeypatch.setenv("HEADSTART_API_KEYS", value)
    monkeypatch.setenv("HEADSTART_API_KEYS_FILE", "")

    with pytest.raises(ApiKeyConfigError, match="HEADSTART_API_KEYS is set but holds no key"):
        load_api_keys(Settings())


SECRET = "s3cr3t-value-9f8e7d6c5b4a"


@pytest.mark.parametrize("entries, message", [
    (SECRET, "no scope"),
    (f"{SECRET}:root", "unknown scope"),
    (f"admin:{SECRET}", "unknown scope"),  # reversed: the key sits where the scope should be
    (f"{SECRET}:", "unknown scope"),
    (":admin", "empty"),
    (f"{SECRET}:admin,{SECRET[:15]}:predict", "shorter than 16"),
    (f"{SECRET} two:admin", "characters"),
    (f"{SECRET}:admin,{SECRET}:predict", "both scopes"),
])
def test_a_bad_key_configuration_stops_start_up_without_showing_the_key(
        tmp_path, caplog, entries, message):
    with caplog.at_level(logging.DEBUG), pytest.raises(ApiKeyConfigError, match=message) as error:
        create_app(settings(tmp_path, api_keys=entries))

    assert "HEADSTART_API_KEYS" in str(error.value)
    assert SECRET[:15] not in str(error.value) and SECRET[:15] not in caplog.text


def test_gunicorn_refuses_to_start_with_a_bad_key_and_does_not_print_it(tmp_path):
    env = {**os.environ, "PORT": "0", "HEADSTART_STORE": str(tmp_path / "store"),
           "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
           "HEADSTART_WEIGHTS_CACHE": str(tmp_path / "cache"),
           "HEADSTART_API_KEYS": f"admin:{SECRET}"}  # reversed: no valid scope
    server = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=120)

    assert server.returncode != 0
    output = server.stdout + server.stderr
    assert "HEADSTART_API_KEYS, entry 1: unknown scope" in output
    assert SECRET[:15] not in output


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("# only a comment\n\n", "holds no keys"),
    (f"{ADMIN_KEY}:admin\n{SECRET}:superuser\n", "entry 2: unknown scope"),
])
def test_a_bad_keys_file_stops_start_up(tmp_path, content, message):
    keys_file = tmp_path / "keys"
    if content is not None:
        keys_file.write_text(content)

    with pytest.raises(ApiKeyConfigError, match=message) as error:
        create_app(settings(tmp_path, api_keys_file=keys_file))

    assert SECRET not in str(error.value) and ADMIN_KEY not in str(error.value)


def test_without_keys_the_service_warns_that_it_is_open(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="service.api.auth"):
        app = create_app(settings(tmp_path))

    assert any(record.levelno == logging.WARNING and "no API keys" in record.getMessage()
               for record in caplog.records)
    assert app.test_client().get("/v1/classifiers").status_code == 200


def test_keys_never_appear_in_the_logs(client, caplog):
    wrong = "wrong-key-a1b2c3d4e5f6a7b8"
    with caplog.at_level(logging.DEBUG):
        assert client.get("/v1/classifiers", headers=bearer(wrong)).status_code == 401
        assert client.get("/v1/classifiers", headers=bearer(ADMIN_KEY)).status_code == 200
        assert post_dataset(client, PREDICT_KEY).status_code == 403
        assert client.get("/v1/classifiers/clf_missing",
                          headers=bearer(PREDICT_KEY)).status_code == 404

    assert caplog.records  # the requests were logged at all
    for key in (wrong, ADMIN_KEY, PREDICT_KEY):
        assert key not in caplog.text
