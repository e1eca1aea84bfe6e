"""Fuzzing the API from its own OpenAPI document (schemathesis, in process over WSGI): whatever a
client sends, the answer is never a 5xx."""

import io
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.config import Settings
from tests.helpers import dataset_zip, delete_all_classifiers

API_KEY = "fuzz-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# NB: too_slow because generating multipart bodies on a busy 2-core machine can be.
FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                              weights_cache=root / "cache", api_keys=f"{API_KEY}:admin",
                              max_upload_bytes=2 * 1024**2))
    client = app.test_client()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:  # the backbone is loaded before fuzzing
        assert time.monotonic() < deadline, client.get("/readyz").json
        time.sleep(0.1)
    yield app
    # NB: fuzzed options may ask for long runs (fine-tuning, hundreds of epochs): none may run
    # on beside later modules' tests.
    delete_all_classifiers(client, AUTH)


@pytest.fixture(scope="module")
def ready_classifier(app) -> str:
    """A trained classifier, so that get, report and predict reach past the 404."""
    client = app.test_client()
    form = {"dataset": (io.BytesIO(dataset_zip(3)), "dataset.zip"),
            "options": '{"max_epochs": 2, "augmentation": {"views": 0}}'}
    created = client.post("/v1/classifiers", data=form, content_type="multipart/form-data",
                          headers=AUTH)
    assert created.status_code == 202, created.json
    url = f"/v1/classifiers/{created.json['id']}"
    deadline = time.monotonic() + 120
    while (status := client.get(url, headers=AUTH).json["status"]) != "ready":
        assert status in ("queued", "training") and time.monotonic() < deadline, status
        time.sleep(0.1)
    return created.json["id"]


@pytest.fixture(scope="module")
def operations(app) -> list:
    """Every operation of the app's own /openapi.json."""
    return [result.ok() for result in
            schemathesis.openapi.from_wsgi("/openapi.json", app).get_all_operations()]


def fuzz(operation, **fixed) -> None:
    """Runs one operation's generated cases, positive and negative, against the app."""
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE, **fixed),
                         operation.as_strategy(GenerationMode.NEGATIVE, **fixed))

    @FUZZ
    @given(case=strategy)
    def call(case):
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

    try:
        call()
    except BaseException as error:
        error.add_note(f"while fuzzing {operation.method.upper()} {operation.path}")
        raise


# NB: training seeds Python's global `random` (keras.utils.set_random_seed) on the runner thread;
# hypothesis would take that for a strategy using `random`, if a job runs while it draws.
RANDOM_RESEEDED = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning")


# NB: one test loops over the operations, because schemathesis' pytest integration
# (`from_fixture(...).parametrize()`) fails on pytest 9.2 (it sets `Node._nodeid`, now gone), and
# the operations are only known once the app is built, which collection must not do.
@RANDOM_RESEEDED
def test_no_input_makes_a_server_error(operations):
    assert {f"{operation.method.upper()} {operation.path}" for operation in operations} >= {
        "POST /v1/classifiers", "GET /v1/classifiers", "GET /v1/classifiers/{classifier_id}",
        "GET /v1/classifiers/{classifier_id}/report", "DELETE /v1/classifiers/{classifier_id}",
        "POST /v1/classifiers/{classifier_id}/predict"}
    for operation in operations:
        fuzz(operation)


@RANDOM_RESEEDED
def test_no_input_to_a_ready_classifier_makes_a_server_error(operations, ready_classifier):
    for operation in operations:
        if "{classifier_id}" in operation.path and operation.method.upper() != "DELETE":
            fuzz(operation, path_parameters={"classifier_id": ready_classifier})


# Found by hand next to the fuzzer: JSON that Python's parser refuses with something other than a
# JSONDecodeError (RecursionError, ValueError for integers over 4300 digits) used to be a 500.
HOSTILE_JSON = ["[" * 100_000 + "]" * 100_000, '{"a": ' + "[" * 5_000 + "]" * 5_000 + "}",
                '{"seed": ' + "9" * 5_000 + "}", '{"instances": [{"b64": ' + "1" * 5_000 + "}]}",
                "{'single': 'quotes'}"]


@pytest.mark.parametrize("text", HOSTILE_JSON)
def test_hostile_options_json_is_a_400(app, text):
    form = {"dataset": (io.BytesIO(b"not read"), "dataset.zip"), "options": text}
    response = app.test_client().post("/v1/classifiers", data=form,
                                      content_type="multipart/form-data", headers=AUTH)

    assert response.status_code == 400, response.json
    assert response.content_type == "application/problem+json"
    assert "options" in response.json["detail"]


@pytest.mark.parametrize("body", [text.encode() for text in HOSTILE_JSON] + [b"\xff{}"])
def test_hostile_predict_json_is_a_400(app, ready_classifier, body):
    response = app.test_client().post(f"/v1/classifiers/{ready_classifier}/predict",
                                      data=body, content_type="application/json", headers=AUTH)

    assert response.status_code == 400, response.json
    assert response.content_type == "application/problem+json"


def test_a_predict_body_for_a_missing_classifier_is_not_read(app):
    response = app.test_client().post("/v1/classifiers/clf_00000000000000000000/predict",
                                      data=HOSTILE_JSON[0].encode(),
                                      content_type="application/json", headers=AUTH)

    assert response.status_code == 404, response.json
