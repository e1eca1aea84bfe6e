"""Versions and aliases through HTTP: a real local store, the real runner thread, random weights
at 32 px."""

import io
import json
import time

import numpy as np
import pytest

from models.promotion import compare
from service.storage.classifiers import job_id, parse_job_id
from tests.helpers import COLOURS, image_bytes, labelled_images, make_zip
# NB: app and client are test_api's fixtures (a module's own instance: its own store)
from tests.test_api import FAST_OPTIONS, app, client, post_dataset, wait_status  # noqa: F401
from tests.test_jobs import services  # noqa: F401  (a fixture: services over a local store)
from tests.test_records import RECORD_BEFORE_SCHEMA_VERSION


def add_version(client, classifier_id, data: bytes | None = None, options=None):
    form = {}
    if data is not None:
        form["dataset"] = (io.BytesIO(data), "more.zip")
    if options is not None:
        form["options"] = json.dumps(options)
    return client.post(f"/v1/classifiers/{classifier_id}/versions", data=form,
                       content_type="multipart/form-data")


def wait_version(client, classifier_id, version, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/classifiers/{classifier_id}/versions/{version}").json
        # NB: the promotion is settled just after the final write
        if body["status"] in ("failed", "cancelled") or body["promotion"] is not None:
            # NB: promotion is settled after the run's last stage
            assert body["refining"] is False and (body["stage"] is not None) == \
                (body["status"] == "ready"), body
            return body
        time.sleep(0.1)
    raise AssertionError(f"version {version} still {body['status']}")


def more_images(start: int, count: int, labels=("red", "blue")) -> dict[str, bytes]:
    """Images not in `labelled_images(start)`: other seeds."""
    return {f"{label}/more{i}.png": image_bytes(COLOURS[label], (40, 32), seed=1000 + i)
            for label in labels for i in range(start, start + count)}


def predict(client, classifier_id, query=""):
    images = [image_bytes(COLOURS[c], (40, 32), seed=77) for c in ("red", "blue", "green")]
    form = {"image": [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]}
    response = client.post(f"/v1/classifiers/{classifier_id}/predict?top_k=3{query}", data=form,
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    return response.json


def alias(client, classifier_id, name, version):
    return client.put(f"/v1/classifiers/{classifier_id}/aliases/{name}",
                      json={"version": version})


@pytest.fixture(scope="module")
def first(client):
    """A red-vs-blue classifier, version 1."""
    response = post_dataset(client, make_zip(labelled_images(6)), FAST_OPTIONS)
    assert response.status_code == 202, response.json
    return wait_status(client, response.json["id"])


@pytest.fixture(scope="module")
def grown(client, first):
    """The classifier of `first` with version 2: more red and blue, and a new label, green
    (which version 1 cannot know, so it is right on fewer of the new images)."""
    added = {**more_images(0, 3), **labelled_images(5, labels=("green",))}
    response = add_version(client, first["id"], make_zip(added))
    assert response.status_code == 202, response.json
    assert response.json["version"] == 2 and response.json["status"] == "queued"
    assert response.headers["Location"].endswith(f"/v1/classifiers/{first['id']}/versions/2")
    return wait_version(client, first["id"], 2)


# ---------------------------------------------------------------- the classifier's versions


def test_a_new_classifier_is_version_1_and_production(first):
    assert first["version"] == 1 and first["versions"] == 1
    assert first["aliases"] == {"production": 1}


def test_a_version_adds_images_and_labels_to_its_base(client, first, grown):
    assert grown["status"] == "ready", grown
    assert grown["base"] == 1 and grown["labels"] == ["blue", "green", "red"]
    assert grown["dataset"]["per_label"] == {"blue": 9, "green": 5, "red": 9}
    assert grown["options"]["head"] == FAST_OPTIONS["head"]  # the base's options, inherited


def test_if_better_promotes_a_version_right_on_more_images_production_never_saw(client, first,
                                                                                   grown):
    promotion = grown["promotion"]
    # the 11 new images: 3 red, 3 blue, 5 green; version 1 knows no green
    assert promotion["images"] == 11 and promotion["unknown_to_old"] == 5
    assert promotion["old_correct"] <= 6 < promotion["new_correct"]
    assert promotion["promoted"] is True and promotion["better"] is True
    body = client.get(f"/v1/classifiers/{first['id']}").json
    assert body["version"] == 2 and body["versions"] == 2 and body["aliases"] == {"production": 2}
    assert body["labels"] == ["blue", "green", "red"]
    assert grown["aliases"] == ["production"]


def test_if_better_keeps_production_without_images_to_compare_on(client, first, grown):
    response = add_version(client, first["id"], None, {"seed": 3})
    assert response.status_code == 202, response.json
    third = wait_version(client, first["id"], response.json["version"])
    assert third["status"] == "ready" and third["options"]["seed"] == 3
    assert third["promotion"]["promoted"] is False and third["promotion"]["images"] == 0
    assert client.get(f"/v1/classifiers/{first['id']}").json["aliases"]["production"] == 2


def test_never_keeps_production_however_good_and_always_takes_it(client):
    created = post_dataset(client, make_zip(labelled_images(5)), FAST_OPTIONS).json
    wait_status(client, created["id"])
    added = make_zip(labelled_images(5, labels=("green",)))
    never = wait_version(client, created["id"],
                         add_version(client, created["id"], added, {"promote": "never"})
                         .json["version"])
    assert never["promotion"]["better"] is True and never["promotion"]["promoted"] is False
    assert client.get(f"/v1/classifiers/{created['id']}").json["version"] == 1
    always = wait_version(client, created["id"], add_version(
        client, created["id"], None, {"promote": "always", "base": 1}).json["version"])
    assert always["promotion"]["promoted"] is True and always["labels"] == ["blue", "red"]
    assert client.get(f"/v1/classifiers/{created['id']}").json["version"] == 3


def test_replace_trains_on_the_new_images_only(client, first, grown):
    replaced = make_zip({**more_images(10, 3), **labelled_images(3, labels=("green",))})
    response = add_version(client, first["id"], replaced, {"replace": True, "promote": "never"})
    assert response.status_code == 202, response.json
    body = wait_version(client, first["id"], response.json["version"])
    assert body["base"] is None and body["dataset"]["images"] == 9


def test_versions_are_listed_newest_first(client, first, grown):
    listed = client.get(f"/v1/classifiers/{first['id']}/versions").json["versions"]
    numbers = [entry["version"] for entry in listed]
    assert numbers == sorted(numbers, reverse=True) and numbers[-2:] == [2, 1]
    assert {"version", "status", "created_at", "dataset", "metrics", "fine_tuned",
            "aliases"} <= set(listed[0])


# ---------------------------------------------------------------- predicting and rolling back


def test_predict_by_version_and_alias_names_the_version(client, first, grown):
    by_default = predict(client, first["id"])
    assert by_default["version"] == 2
    old = predict(client, first["id"], "&version=1")
    assert old["version"] == 1
    assert {row["label"] for row in old["predictions"][0]["top_k"]} == {"red", "blue"}
    assert {row["label"] for row in by_default["predictions"][0]["top_k"]} == \
        {"red", "blue", "green"}
    assert alias(client, first["id"], "staging", 1).status_code == 200
    assert predict(client, first["id"], "&alias=staging") == old


def test_moving_production_back_restores_the_old_predictions_exactly(client, first, grown):
    old = predict(client, first["id"], "&version=1")
    assert alias(client, first["id"], "production", 1).json["aliases"]["production"] == 1
    try:
        assert predict(client, first["id"]) == old
        assert client.get(f"/v1/classifiers/{first['id']}/report").json["labels"] == \
            ["blue", "red"]
    finally:
        assert alias(client, first["id"], "production", 2).status_code == 200
    assert predict(client, first["id"])["version"] == 2


def test_unknown_versions_and_aliases_are_404(client, first, grown):
    cid = first["id"]
    assert client.get(f"/v1/classifiers/{cid}/versions/99").status_code == 404
    assert client.post(f"/v1/classifiers/{cid}/predict?version=99").status_code == 404
    assert client.post(f"/v1/classifiers/{cid}/predict?alias=nope").status_code == 404
    assert alias(client, cid, "production", 99).status_code == 404
    assert alias(client, cid, "Bad Name", 1).status_code in (404, 422)
    assert add_version(client, cid, None, {"base": 99}).status_code == 404
    assert add_version(client, cid, None, {"replace": True}).status_code == 422
    assert add_version(client, cid, None, {"promote": "sometimes"}).status_code == 422


def test_a_version_report_is_its_own(client, first, grown):
    report = client.get(f"/v1/classifiers/{first['id']}/versions/2/report").json
    assert report["labels"] == ["blue", "green", "red"] and report["promotion"]["against"] == 1
    # the feature cache: version 1's 12 images (2 views each) came from it, the 11 new were computed
    features = report["features"]
    assert (features["from_cache"], features["computed"]) == (12 * 2, 11 * 2), features
    assert client.get(f"/v1/classifiers/{first['id']}/versions/1/report").json["labels"] == \
        ["blue", "red"]


# ---------------------------------------------------------------- deleting


def test_a_version_an_alias_points_at_cannot_be_deleted(client, first, grown):
    cid = first["id"]
    response = client.delete(f"/v1/classifiers/{cid}/versions/2")
    assert response.status_code == 409 and "production" in response.json["detail"]
    assert client.get(f"/v1/classifiers/{cid}/versions/2").status_code == 200


def test_deleting_a_version_removes_it_and_keeps_the_others(client):
    created = post_dataset(client, make_zip(labelled_images(5)), FAST_OPTIONS).json
    wait_status(client, created["id"])
    second = wait_version(client, created["id"], add_version(
        client, created["id"], make_zip(more_images(0, 2)), {"promote": "never"}).json["version"])
    assert client.delete(f"/v1/classifiers/{created['id']}/versions/1").status_code == 409
    assert alias(client, created["id"], "production", second["version"]).status_code == 200
    assert client.delete(f"/v1/classifiers/{created['id']}/versions/1").status_code == 204
    assert client.get(f"/v1/classifiers/{created['id']}/versions/1").status_code == 404
    body = client.get(f"/v1/classifiers/{created['id']}").json
    assert body["versions"] == 1 and body["version"] == 2 and body["status"] == "ready"
    assert predict(client, created["id"])["version"] == 2
    # a new version never reuses a number
    assert add_version(client, created["id"], None, {"promote": "never"}).json["version"] == 3
    wait_version(client, created["id"], 3)


def test_deleting_the_classifier_removes_every_version(app, client):
    created = post_dataset(client, make_zip(labelled_images(5)), FAST_OPTIONS).json
    wait_status(client, created["id"])
    wait_version(client, created["id"], add_version(
        client, created["id"], make_zip(more_images(0, 2))).json["version"])
    assert client.delete(f"/v1/classifiers/{created['id']}").status_code == 204
    root = app.extensions["headstart"].store.blobs.root
    assert not list(root.glob(f"classifiers/{created['id']}/**/*.*"))
    assert not list(root.glob(f"active/{created['id']}*"))
    assert client.get(f"/v1/classifiers/{created['id']}/versions").status_code == 404


# ---------------------------------------------------------------- records and job ids


def test_a_record_written_before_versions_is_version_1(tmp_path, app):
    """A store holding a classifier exactly as the code before versions wrote it."""
    store = app.extensions["headstart"].store
    record = json.loads(RECORD_BEFORE_SCHEMA_VERSION)
    record["id"] = "clf_00abcdefghijklmnopqs"
    store.blobs.put(f"classifiers/{record['id']}/record.json", json.dumps(record).encode())
    client = app.test_client()
    body = client.get(f"/v1/classifiers/{record['id']}").json
    assert body["version"] == 1 and body["versions"] == 1 and body["aliases"] == {"production": 1}
    listed = client.get(f"/v1/classifiers/{record['id']}/versions").json["versions"]
    assert [(v["version"], v["status"], v["aliases"]) for v in listed] == \
        [(1, "ready", ["production"])]


def test_job_ids_carry_the_version():
    assert job_id("clf_00abcdefghijklmnopqr", 1) == "clf_00abcdefghijklmnopqr"
    assert parse_job_id(job_id("clf_00abcdefghijklmnopqr", 12)) == ("clf_00abcdefghijklmnopqr", 12)
    assert parse_job_id("clf_00abcdefghijklmnopqr") == ("clf_00abcdefghijklmnopqr", 1)


def test_an_alias_moved_while_a_version_trains_does_not_stop_it(client):
    created = post_dataset(client, make_zip(labelled_images(5)), FAST_OPTIONS).json
    wait_status(client, created["id"])
    queued = add_version(client, created["id"], make_zip(more_images(0, 3)),
                         {**FAST_OPTIONS, "augmentation": {"views": 3}}).json
    for _ in range(5):
        assert alias(client, created["id"], "staging", 1).status_code == 200
    body = wait_version(client, created["id"], queued["version"])
    assert body["status"] == "ready", body
    assert client.get(f"/v1/classifiers/{created['id']}").json["aliases"]["staging"] == 1


# ---------------------------------------------------------------- the comparison


def test_the_comparison_counts_unknown_labels_as_the_old_versions_errors():
    new = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.8], [0.6, 0.3, 0.1]])
    old = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.3, 0.7]])  # labels b, r
    truth = np.array([2, 1, 1, 0])  # r, g (unknown to old), g, b
    result = compare(new, old, truth, ["b", "g", "r"], ["b", "r"])
    assert (result["new_correct"], result["old_correct"], result["unknown_to_old"]) == (2, 1, 2)
    assert result["better"] is True
    tie = compare(np.array([[0.1, 0.1, 0.8]]), old[:1], np.array([2]), ["b", "g", "r"],
                  ["b", "r"])
    assert tie["new_correct"] == tie["old_correct"] == 1 and tie["better"] is False
    with pytest.raises(ValueError):
        compare(new, old[:2], truth, ["b", "g", "r"], ["b", "r"])


def test_a_version_event_names_production_first_and_when_it_moves():
    from service.jobs.events import changes

    resource = {"id": "clf_00abcdefghijklmnopqr", "status": "ready", "updated_at":
                "2026-12-01T10:00:00+00:00", "version": 1, "versions": 2,
                "aliases": {"production": 1}, "progress": None}
    sent, cursor, finished = changes(resource, None, resource["id"])
    assert [event.kind for event in sent] == ["status", "version", "done"]
    moved = {**resource, "version": 2, "aliases": {"production": 2},
             "updated_at": "2026-12-01T10:01:00+00:00"}
    sent, _, _ = changes(moved, cursor, resource["id"])
    assert [(event.kind, event.data.get("version")) for event in sent] == [("version", 2)]
    assert sent[0].data["aliases"] == {"production": 2}


# ---------------------------------------------------------------- a version's job, without HTTP


def test_a_version_job_is_requeued_by_its_job_id_and_runs_by_it(services):
    """The sweep finds a version's lost job in the `active/` index and queues its job id again;
    a delivery of that id claims and trains that version, not version 1."""
    from datetime import timedelta

    from models.options import VersionOptions
    from service.jobs import recovery, versions
    from service.jobs.training import run_training_job
    from service.storage.records import Lease, utc_now
    from tests.test_jobs import create

    classifier_id = create(services)
    run_training_job(services, classifier_id)
    record = versions.add_version(services, classifier_id,
                                  io.BytesIO(make_zip(more_images(0, 2))),
                                  VersionOptions(promote="always"))
    job = f"{classifier_id}.v2"
    assert services.runner.submitted[-1] == job and services.store.active_ids() == [job]
    current = services.store.load_job(job)
    lost = current.record.model_copy(deep=True)
    lost.status, lost.attempts = "training", 1
    lost.lease = Lease(owner="gone:1:1", heartbeat_at=utc_now() - timedelta(seconds=60))
    services.store.save_record(lost, current.tag)
    recovery.sweep(services)
    assert services.runner.submitted[-1] == job
    assert services.store.load_record(classifier_id, 2).status == "queued"

    run_training_job(services, job)
    trained = services.store.load_record(classifier_id, 2)
    assert (trained.status, trained.attempts, trained.version) == ("ready", 2, record.version)
    assert services.store.load_record(classifier_id).run != trained.run  # version 1 untouched
    assert services.store.active_ids() == []
    assert services.store.load_versions(classifier_id)[0].production == 2


def test_an_export_names_the_version_asked_for_or_productions(services):
    from models.options import VersionOptions
    from service.errors import Conflict, NotFound
    from service.jobs import export, versions
    from service.jobs.training import run_training_job
    from tests.test_jobs import create

    class Builds:  # the builder thread's queue, as the export use case hands it work
        def __init__(self):
            self.submitted = []

        def submit(self, classifier_id, run, export_format):
            self.submitted.append((classifier_id, run, export_format))

    builds = Builds()
    classifier_id = create(services)
    run_training_job(services, classifier_id)
    versions.add_version(services, classifier_id, io.BytesIO(make_zip(more_images(0, 2))),
                         VersionOptions(promote="always"))
    with pytest.raises(Conflict, match="version 2"):  # queued: nothing to export yet
        export.export_classifier(services, builds, classifier_id, "onnx", 2)
    run_training_job(services, f"{classifier_id}.v2")
    store = services.store
    first, second = store.load_record(classifier_id, 1), store.load_record(classifier_id, 2)
    assert export.export_classifier(services, builds, classifier_id, "onnx", None).version == 2
    assert export.export_classifier(services, builds, classifier_id, "onnx", 1).version == 1
    assert builds.submitted == [(classifier_id, second.run, "onnx"),
                                (classifier_id, first.run, "onnx")]
    assert versions.record_of_run(services, classifier_id, first.run).version == 1
    with pytest.raises(NotFound):
        export.export_classifier(services, builds, classifier_id, "onnx", 7)
