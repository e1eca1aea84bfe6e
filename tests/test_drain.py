"""SIGTERM drains: a request in flight when gunicorn is told to stop still gets its answer, and
then the server exits 0. Through a real gunicorn process on a free port, as `make run` starts it."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.localservers import free_port
from service.config import Settings
from service.app import open_store
from tests.helpers import call, dataset_zip, multipart

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "drain-test-key-7c6b5a4f3e2d1c0b"


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(tmp_path / "store"),
           "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
           "HEADSTART_WEIGHTS_CACHE": str(tmp_path / "cache"),
           "HEADSTART_API_KEYS": f"{API_KEY}:admin"}
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            if call("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(log_path.read_text())
        time.sleep(0.25)
    yield port, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    log.close()


def wait_for_line(log_path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log_path.read_text()}"
        time.sleep(0.05)


def test_sigterm_lets_an_upload_in_flight_finish_then_exits_0(server, tmp_path):
    port, process, log_path = server
    body, content_type = multipart({
        "dataset": [("toys.zip", dataset_zip(8))],
        "options": json.dumps({"max_epochs": 2, "augmentation": {"views": 0}})})
    upload = socket.create_connection(("127.0.0.1", port), timeout=60)
    upload.sendall((f"POST /v1/classifiers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {API_KEY}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
    # gunicorn answers 100 Continue as it hands the request to the app: from here it is in
    # flight, and the route waits for the rest of the body.
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += upload.recv(1)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    upload.sendall(body[:len(body) // 2])

    process.send_signal(signal.SIGTERM)
    wait_for_line(log_path, "Handling signal: term")
    time.sleep(1.5)  # the worker has its SIGTERM and has stopped accepting; the body is not in
    assert process.poll() is None, "the server quit with a request in flight"
    upload.sendall(body[len(body) // 2:])

    response = http.client.HTTPResponse(upload, method="POST")
    response.begin()
    created = json.loads(response.read())
    upload.close()
    assert response.status == 202, created
    assert process.wait(timeout=90) == 0
    stored = open_store(Settings(store=str(tmp_path / "store"))).list_records()
    assert created["id"] in [record.id for record in stored]  # accepted, so kept
    server_log = log_path.read_text()
    assert '"POST /v1/classifiers HTTP/1.1" 202' in server_log  # the access log has the request
    assert API_KEY not in server_log  # … but not its key
