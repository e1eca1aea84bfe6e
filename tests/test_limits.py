"""Upload overload: past `max_concurrent_uploads`, POST /v1/classifiers is a fast 503."""

import io
import threading
import time

import pytest

from service.app import create_app
from service.api.limits import UploadLimiter
from service.config import Settings
from tests.helpers import dataset_zip

OPTIONS = '{"max_epochs": 2, "augmentation": {"views": 0}, ' \
          '"head": {"hidden_units": 0, "dropout": 0.1, "l2": 0.001}}'


def post_dataset(client):
    form = {"dataset": (io.BytesIO(dataset_zip(3)), "dataset.zip"), "options": OPTIONS}
    return client.post("/v1/classifiers", data=form, content_type="multipart/form-data")


def listed_ids(client) -> set[str]:
    return {c["id"] for c in client.get("/v1/classifiers").json["classifiers"]}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    app = create_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                              weights_cache=root / "cache", max_concurrent_uploads=2))
    client = app.test_client()
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json
        time.sleep(0.1)
    yield app
    # Training that outlives the module would run beside later tests (and reseed `random`).
    deadline = time.monotonic() + 120
    while any(c["status"] in ("queued", "training")
              for c in client.get("/v1/classifiers").json["classifiers"]):
        assert time.monotonic() < deadline, "training still running"
        time.sleep(0.1)


def test_a_full_limiter_refuses_an_upload_at_once_and_stores_nothing(app):
    client, limiter = app.test_client(), app.extensions["headstart.uploads"]
    before = listed_ids(client)

    with limiter.slot(), limiter.slot():  # two uploads in progress: the limit
        started = time.monotonic()
        response = post_dataset(client)
        elapsed = time.monotonic() - started
        assert client.get("/v1/classifiers").status_code == 200  # reads still pass

    assert response.status_code == 503 and elapsed < 2
    assert response.content_type == "application/problem+json"
    assert int(response.headers["Retry-After"]) > 0
    assert "2 dataset uploads" in response.json["detail"]
    assert listed_ids(client) == before


def test_a_freed_slot_takes_the_next_upload(app):
    client, limiter = app.test_client(), app.extensions["headstart.uploads"]

    with limiter.slot():  # one of two slots taken
        accepted = post_dataset(client)

    assert accepted.status_code == 202, accepted.json
    assert accepted.json["id"] in listed_ids(client)


def test_concurrent_uploads_are_accepted_or_refused_and_no_accepted_one_is_lost(app):
    client = app.test_client()
    before = listed_ids(client)
    start = threading.Barrier(6)
    responses = []

    def upload():
        start.wait()
        responses.append(post_dataset(app.test_client()))

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    statuses = sorted(response.status_code for response in responses)
    assert len(statuses) == 6 and set(statuses) <= {202, 503}, statuses
    assert 202 in statuses
    accepted = {response.json["id"] for response in responses if response.status_code == 202}
    assert listed_ids(client) - before == accepted


def test_an_error_inside_an_upload_frees_its_slot(app):
    client, limiter = app.test_client(), app.extensions["headstart.uploads"]

    for _ in range(limiter.limit + 1):
        refused = client.post("/v1/classifiers", data={"options": OPTIONS},
                              content_type="multipart/form-data")
        assert refused.status_code == 400  # no dataset part

    assert post_dataset(client).status_code == 202


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit=0"):
        UploadLimiter(0)
