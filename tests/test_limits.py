"""Bounds on one process's work: past `max_concurrent_uploads`, POST /v1/classifiers is a fast
503; training options over the feature memory budget are a 422; predict bodies have a limit of
their own, far below the upload limit."""

import io
import json
import threading
import time

import pytest

from models.backbone import FEATURE_DIM
from service.api.limits import UploadLimiter
from service.config import Settings
from tests.helpers import dataset_zip, ready_app

MAX_PREDICT_BYTES = 4096
# The uploads here (6 images, no augmented views) fit; 6 images with 8 views do not.
MAX_FEATURE_BYTES = 6 * 2 * FEATURE_DIM * 4 * 2

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
    with ready_app(Settings(store=str(root / "store"), backbone_weights="random", image_size=32,
                            weights_cache=root / "cache", max_concurrent_uploads=2,
                            max_predict_bytes=MAX_PREDICT_BYTES,
                            max_feature_bytes=MAX_FEATURE_BYTES)) as app:
        yield app


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


def test_past_the_limit_concurrent_uploads_are_refused_and_no_accepted_one_is_lost(
        app, monkeypatch):
    """Two uploads are held inside their slots (at the dataset write); four more arrive
    meanwhile and are refused at once. A limiter that never refused would hold them too."""
    client, store = app.test_client(), app.extensions["headstart"].store
    before = listed_ids(client)
    inside, release = threading.Semaphore(0), threading.Event()
    save_dataset = store.save_dataset

    def held(*arguments):  # (classifier id, archive, version)
        inside.release()
        assert release.wait(timeout=60)
        save_dataset(*arguments)

    monkeypatch.setattr(store, "save_dataset", held)
    responses = []

    def upload():
        responses.append(post_dataset(app.test_client()))

    holders = [threading.Thread(target=upload) for _ in range(2)]
    for thread in holders:
        thread.start()
    for _ in holders:
        assert inside.acquire(timeout=60)  # both slots are taken, by uploads held inside
    latecomers = [threading.Thread(target=upload) for _ in range(4)]
    for thread in latecomers:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in latecomers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    answered_while_held = [response.status_code for response in responses]
    release.set()
    for thread in holders + latecomers:
        thread.join(timeout=60)

    assert answered_while_held == [503] * 4
    assert sorted(response.status_code for response in responses) == [202] * 2 + [503] * 4
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


def test_options_over_the_feature_budget_are_a_422_naming_the_limit(app):
    client = app.test_client()
    before = listed_ids(client)
    form = {"dataset": (io.BytesIO(dataset_zip(3)), "dataset.zip"),
            "options": json.dumps({"augmentation": {"views": 8}})}
    response = client.post("/v1/classifiers", data=form, content_type="multipart/form-data")

    assert response.status_code == 422 and response.mimetype == "application/problem+json"
    assert "HEADSTART_MAX_FEATURE_BYTES" in response.json["detail"]
    assert response.json["errors"] == [{"field": "options.augmentation.views",
                                         "message": "feature memory budget"}]
    assert listed_ids(client) == before


def test_predict_bodies_have_their_own_limit(app):
    """An upload of that size is welcome; a predict body of it, to a ready classifier (an
    unknown one is a 404 before any body is read), is a 413 naming the limit."""
    client = app.test_client()
    dataset = dataset_zip(3)
    assert len(dataset) > MAX_PREDICT_BYTES
    accepted = post_dataset(client)
    assert accepted.status_code == 202, accepted.json
    classifier_id = accepted.json["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/classifiers/{classifier_id}").json["status"] != "ready":
        assert time.monotonic() < deadline, "the classifier never became ready"
        time.sleep(0.2)
    too_big = json.dumps({"instances": [{"b64": "A" * MAX_PREDICT_BYTES}]})
    for body, content_type in [(too_big, "application/json"),
                               ({"image": (io.BytesIO(b"A" * MAX_PREDICT_BYTES), "a.png")},
                                "multipart/form-data")]:
        response = client.post(f"/v1/classifiers/{classifier_id}/predict", data=body,
                               content_type=content_type)
        assert response.status_code == 413, content_type
        assert response.json["detail"] == \
            f"the request body is larger than the limit of {MAX_PREDICT_BYTES} bytes " \
            "(HEADSTART_MAX_PREDICT_BYTES)"