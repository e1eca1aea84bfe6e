"""A real gunicorn serving Headstart on a free port, started as `make run` starts it (random
weights, 32 px), for tests that talk to it over the network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tools.localservers import free_port
from service.config import Settings
from service.app import open_store
from service.storage.classifiers import ClassifierStore
from tests.helpers import call, labelled_images, make_zip, multipart

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "live-admin-key-0123456789abcdef"
PREDICT_KEY = "live-predict-key-0123456789abcdef"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    store_path: Path

    def store(self) -> ClassifierStore:
        """The server's own store, for tests that write records as a worker would."""
        return open_store(Settings(store=str(self.store_path)))


@contextmanager
def start_server(tmp: Path, **env: str) -> Iterator[LiveServer]:
    """Serves until the block ends, then SIGTERM (SIGKILL if it does not stop in time)."""
    port = free_port()
    environment = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(tmp / "store"),
                   "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
                   "HEADSTART_WEIGHTS_CACHE": str(tmp / "cache"), **env}
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py",
             "service.wsgi:app"], cwd=ROOT, env=environment, stdout=log,
            stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if call("GET", url + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log_path.read_text(errors="replace"))
                time.sleep(0.25)
            yield LiveServer(url, process, log_path, tmp / "store")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)


def create_classifier(url: str, key: str | None, per_label: int = 8,
                      options: dict | None = None) -> str:
    """POSTs a toy dataset (red and blue images) and returns the new classifier's id."""
    body, content_type = multipart({
        "dataset": [("toys.zip", make_zip(labelled_images(per_label)))],
        "options": json.dumps(options or {})})
    request_headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url + "/v1/classifiers", data=body, method="POST",
                                     headers={"Content-Type": content_type, **request_headers})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 202
        return json.loads(response.read())["id"]
