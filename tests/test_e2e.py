"""End to end through a real gunicorn process on a free port, started as `make run` starts it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.localservers import free_port
from tests.helpers import COLOURS, call, dataset_zip, image_bytes, multipart

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(tmp / "store"),
           "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
           "HEADSTART_WEIGHTS_CACHE": str(tmp / "cache")}
    log = open(tmp / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if call("GET", base + "/readyz")[0] == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError((tmp / "server.log").read_text())
        time.sleep(0.25)
    yield base, process, tmp / "server.log"
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    log.close()


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
