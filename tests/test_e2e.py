"""End to end through a real gunicorn process on a free port, started as `make run` starts it."""

import json
import signal
import time

import pytest

from tests.helpers import COLOURS, call, dataset_zip, gunicorn_server, image_bytes, multipart


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with gunicorn_server(tmp_path_factory.mktemp("e2e")) as running:
        yield running


def test_create_train_predict_report_delete(server):
    base, _, log = server
    body, content_type = multipart({
        "dataset": [("toys.zip", dataset_zip(8))],
        "options": json.dumps({"max_epochs": 20, "augmentation": {"views": 1}})})
    status, headers, created = call("POST", base + "/v1/classifiers", body, content_type)
    assert status == 202, created
    url = base + headers["Location"]

    deadline = time.monotonic() + 120
    while (resource := call("GET", url)[2])["status"] in ("queued", "training"):
        assert time.monotonic() < deadline, resource
        time.sleep(0.25)
    assert resource["status"] == "ready", resource

    status, _, report = call("GET", url + "/report")
    assert status == 200 and report["m"]["train"] == report["m"]["validation"] == 16

    body, content_type = multipart({"image": [("a.png", image_bytes(COLOURS["red"], seed=7)),
                                              ("b.png", image_bytes(COLOURS["blue"], seed=8))]})
    status, _, predicted = call("POST", url + "/predict?top_k=2", body, content_type)
    assert status == 200 and len(predicted["predictions"]) == 2
    assert predicted["predictions"][0]["label"] in ("red", "blue")

    assert call("DELETE", url)[0] == 204
    assert call("GET", url)[0] == 404
    assert "RANDOM" in log.read_text()  # random weights are announced in the logs


def test_errors_are_problem_json_over_the_wire(server):
    base, _, _ = server
    status, headers, body = call("GET", base + "/v1/nowhere")
    assert status == 404 and headers["Content-Type"] == "application/problem+json"
    assert body["status"] == 404


def test_sigterm_stops_the_server_cleanly(server):
    _, process, _ = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
