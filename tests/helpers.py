"""Small, real test data: images and dataset zips made in memory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
#: Two visually distinct classes that even a randomly initialised backbone separates.
COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 180, 60)}


def image_bytes(colour=(128, 128, 128), size=(40, 32), fmt="PNG", seed=0, mode="RGB") -> bytes:
    """An encoded image: a colour with pixel noise and a random bright square, so images differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)),
                     0, 255).astype(np.uint8)
    y, x = rng.integers(0, max(1, size[1] // 2)), rng.integers(0, max(1, size[0] // 2))
    pixels[y:y + size[1] // 3, x:x + size[0] // 3] = 255
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def checkerboard(size=32, square=4) -> bytes:
    """Nothing like a noisy single-colour photo: black and white squares."""
    y, x = np.indices((size, size)) // square
    pixels = np.where(((x + y) % 2)[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def labelled_images(per_label: int = 8, labels=("red", "blue"), size=(40, 32),
                    root: str = "") -> dict[str, bytes]:
    """Zip members {root/label/i.png: bytes} for a learnable toy dataset."""
    return {f"{root}{label}/{i}.png": image_bytes(COLOURS[label], size, seed=zlib.crc32(f"{label}{i}".encode()))
            for label in labels for i in range(per_label)}


def dataset_zip(per_label: int = 8, labels=("red", "blue"), **kwargs) -> bytes:
    return make_zip(labelled_images(per_label, labels, **kwargs))


def forced_loss(stage, loss: float):
    """A real training stage (`models.training.STAGES`) whose result claims `loss`: how stages
    are compared is tested on real heads with chosen losses."""
    def run(staged):
        result = stage(staged)
        result.val_loss = loss
        return result
    return run


class CollectingRunner:
    """The runner interface, keeping what was submitted; the tests run the jobs themselves
    (`run_training_job`)."""

    def __init__(self):
        self.submitted: list[str] = []

    def submit(self, classifier_id):
        self.submitted.append(classifier_id)

    def cancel(self, classifier_id):
        pass

    def ping(self):
        pass

    def depth(self):
        return len(self.submitted)


def multipart(fields: dict[str, list[tuple[str, bytes]] | str]) -> tuple[bytes, str]:
    """Encodes multipart/form-data: name → text, or name → [(filename, bytes), …]."""
    boundary = "headstart-" + uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        parts = [(None, value.encode())] if isinstance(value, str) else value
        for filename, data in parts:
            disposition = f'form-data; name="{name}"'
            if filename is not None:
                disposition += f'; filename="{filename}"'
            body.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
            body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def call(method: str, url: str, body: bytes | None = None, content_type: str | None = None,
         timeout: float = 30):
    """One HTTP request: (status, headers, parsed JSON body or None)."""
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            return response.status, dict(response.headers), json.loads(data) if data else None
    except urllib.error.HTTPError as error:
        data = error.read()
        return error.code, dict(error.headers), json.loads(data) if data else None


def require_server(program: Callable[[], str]) -> None:
    """Skips the test when `program` (e.g. `tools.localservers.redis_server_program`) finds no
    installed server; fails instead where HEADSTART_TEST_REQUIRE_SERVERS is set (CI)."""
    try:
        program()
    except FileNotFoundError as error:
        if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
            pytest.fail(str(error))
        pytest.skip(str(error))


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a deployment stops it; killed if it has not exited within 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def delete_all_classifiers(client, headers: dict | None = None, timeout_s: float = 60) -> None:
    """Deletes every classifier of an app (a delete stops its run within seconds) and waits
    until the list is empty: for fixtures whose tests may leave long runs behind."""
    deadline = time.monotonic() + timeout_s
    while listed := client.get("/v1/classifiers?limit=1000", headers=headers).json["classifiers"]:
        for classifier in listed:
            client.delete(f"/v1/classifiers/{classifier['id']}", headers=headers)
        assert time.monotonic() < deadline, f"{len(listed)} classifiers not deleted"
        time.sleep(0.1)


@contextlib.contextmanager
def ready_app(settings):
    """The app `create_app(settings)` builds, once /readyz answers 200; on exit, waits (up to
    120 s) until none of its classifiers is queued, training or refining (ready, with later
    stages still running): training that outlives a test module would run beside later tests
    (and reseed `random`, and allocate while they measure memory)."""
    from service.app import create_app

    app = create_app(settings)
    client = app.test_client()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json
        time.sleep(0.1)
    yield app
    deadline = time.monotonic() + 120
    while any(c["status"] in ("queued", "training") or c.get("refining")
              for c in client.get("/v1/classifiers").json["classifiers"]):
        assert time.monotonic() < deadline, "training still running"
        time.sleep(0.1)


@contextlib.contextmanager
def gunicorn_server(tmp: Path, **env: str):
    """A real gunicorn, started as `make run` starts it but bound to 127.0.0.1, on random
    weights at 32 px; yields (base URL, process, log path) once /readyz answers 200."""
    from tools.localservers import free_port

    port = free_port()
    environment = {**os.environ, "PORT": str(port), "HEADSTART_STORE": str(tmp / "store"),
                   "HEADSTART_BACKBONE_WEIGHTS": "random", "HEADSTART_IMAGE_SIZE": "32",
                   "HEADSTART_WEIGHTS_CACHE": str(tmp / "cache"), **env}
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py",
             "--bind", f"127.0.0.1:{port}", "service.wsgi:app"],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if call("GET", base + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log_path.read_text())
                time.sleep(0.25)
            yield base, process, log_path
        finally:
            if process.poll() is None:
                stop(process)
